"""``llmos bench memory``: archival memory put/search through the real kernel.

A private kernel daemon is started on a throwaway state directory (the model driver is
the simulator: this benchmark exercises memory, not generation; the embedding model,
SQLite and the vector index are the real ones). One LLM process fills its archival
memory with synthetic sentences in batches (``mem.put``), and at each size (default
1k, 10k, 100k entries) the benchmark measures:

* ``mem.put`` of one entry: p50/p99 latency over the socket (embedding + commit);
* bulk fill throughput (entries/s, batches of 256) and the share spent embedding;
* ``mem.search`` (k=10): end-to-end p50/p99 latency, and the kernel-reported split
  into query embedding time and search time (the vector scan plus reading the rows),
  with and without a metadata filter.

Goal (the memory issue): search p50 under 20 ms at 100k entries on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from llmos.client import Process
from llmos.ctl.private import PrivateKernel

err = Console(stderr=True)

#: The program namespace the entries live in: a later run with the same --state-dir
#: (a new process of a new program with the same namespace name) finds them.
NS = "bench-memory"

_SUBJECTS = [
    "The customer",
    "Our warehouse",
    "The new policy",
    "A delivery driver",
    "The support team",
    "The quarterly report",
    "My neighbour's cat",
    "The database server",
    "A small bakery",
    "The museum",
]
_VERBS = [
    "announced",
    "refused",
    "described",
    "forgot",
    "shipped",
    "repaired",
    "questioned",
    "celebrated",
    "delayed",
    "explained",
]
_OBJECTS = [
    "a refund for the broken kettle",
    "the late parcel to Lisbon",
    "new opening hours on Sundays",
    "a recipe for sourdough bread",
    "the outage on Tuesday night",
    "three tickets to the concert",
    "a discount for returning customers",
    "the lost passport",
    "a faster route through the city",
    "the annual budget for training",
]
_QUERIES = [
    "when can I get my money back for a faulty appliance",
    "package arriving late abroad",
    "bread baking instructions",
    "server went down overnight",
    "cheaper prices for loyal clients",
    "missing travel documents",
    "weekend schedule changes",
    "music event tickets",
]


def _sentence(rng: random.Random, i: int) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} (note {i})."


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))] if xs else float("nan")


def _ms(x: float) -> float:
    return round(x * 1000, 3)


def _fill(
    p: Process, have: int, want: int, rng: random.Random, progress: Progress, task: Any
) -> dict[str, float]:
    """Bulk-insert entries ``have .. want``; returns throughput and embedding share."""
    t0, embed_s, batch = time.perf_counter(), 0.0, 256
    for start in range(have, want, batch):
        n = min(batch, want - start)
        entries = [
            {"text": _sentence(rng, i), "metadata": {"kind": i % 10}}
            for i in range(start, start + n)
        ]
        res = p.call("mem.put", {"entries": entries, "namespace": NS}, deadline_ms=600_000)
        embed_s += res["embed_s"]
        progress.advance(task, n)
    wall = time.perf_counter() - t0
    return {
        "fill_entries_per_s": round((want - have) / wall, 1) if wall else 0.0,
        "fill_embed_share": round(embed_s / wall, 3) if wall else 0.0,
    }


def _measure_size(
    p: Process, size: int, searches: int, puts: int, rng: random.Random
) -> dict[str, Any]:
    row: dict[str, Any] = {"entries": size}
    put_lat, put_embed = [], []
    ids = []
    for i in range(puts):
        s = time.perf_counter()
        res = p.call(
            "mem.put",
            {
                "entries": [{"text": _sentence(rng, size + i), "metadata": {"kind": 99}}],
                "namespace": NS,
            },
        )
        put_lat.append(time.perf_counter() - s)
        put_embed.append(res["embed_s"])
        ids.extend(res["ids"])
    p.call("mem.delete", {"ids": ids, "namespace": NS})  # keep the size exact
    row |= {
        "put_p50_ms": _ms(_pct(put_lat, 0.5)),
        "put_p99_ms": _ms(_pct(put_lat, 0.99)),
        "put_embed_p50_ms": _ms(_pct(put_embed, 0.5)),
        "puts_per_s": round(puts / sum(put_lat), 1),
    }
    for label, filt in (("search", None), ("filtered", {"kind": 3})):
        lat, emb, srch = [], [], []
        for i in range(searches):
            args: dict[str, Any] = {
                "query": _QUERIES[i % len(_QUERIES)],
                "k": 10,
                "namespaces": [NS],
            }
            if filt:
                args["filter"] = filt
            s = time.perf_counter()
            res = p.call("mem.search", args)
            lat.append(time.perf_counter() - s)
            emb.append(res["embed_s"])
            srch.append(res["search_s"])
            assert res["hits"], "a search over a full index found nothing"
        row |= {
            f"{label}_p50_ms": _ms(_pct(lat, 0.5)),
            f"{label}_p99_ms": _ms(_pct(lat, 0.99)),
            f"{label}_embed_p50_ms": _ms(_pct(emb, 0.5)),
            f"{label}_scan_p50_ms": _ms(_pct(srch, 0.5)),
            f"{label}_scan_p99_ms": _ms(_pct(srch, 0.99)),
            f"{label}_per_s": round(searches / sum(lat), 1),
        }
    return row


def bench_memory(args: argparse.Namespace) -> int:
    sizes = sorted(int(x) for x in args.sizes.split(","))
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if args.state_dir is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmos-bench-mem-")))
        else:
            base = Path(args.state_dir)
            base.mkdir(parents=True, exist_ok=True)
        marker = base / "bench-memory.json"
        with err.status(
            "starting a private kernel (simulated model driver; real embedding model and SQLite)"
        ):
            kernel = PrivateKernel(base, "--driver", "sim").start()
        try:
            with kernel.admin() as admin:
                # A named namespace: a later run on the same --state-dir finds the entries.
                p = admin.spawn("bench-memory", namespace=NS)
                with err.status("loading the embedding model"):
                    p.memory_of(NS).search("warm up")
                have = json.loads(marker.read_text())["entries"] if marker.exists() else 0
                if have == 0:
                    p.memory_of(NS).put("warm-up entry")
                    have = 1
                with Progress(console=err, transient=True) as progress:
                    for size in sizes:
                        task = progress.add_task(f"filling to {size:,} entries", total=size - have)
                        fill = _fill(p, have, size, rng, progress, task)
                        have = max(have, size)
                        marker.write_text(json.dumps({"entries": have}))
                        progress.remove_task(task)
                        if size < have:
                            err.print(
                                f"[yellow]{size:,} entries: skipped, "
                                f"{args.state_dir} holds {have:,}[/]"
                            )
                            continue
                        row = _measure_size(p, size, args.searches, args.puts, rng) | fill
                        row["load_avg_1m"] = round(os.getloadavg()[0], 2)
                        rows.append(row)
                        err.print(f"[dim]{size:,} entries: search p50 {row['search_p50_ms']} ms[/]")
                rss = admin.stat(procs=False).host.kernel_rss
        finally:
            kernel.stop()
    report = {
        "bench": "memory",
        "embedding_model": "all-MiniLM-L6-v2",
        "rows": rows,
        "kernel_rss": rss,
        "goal": "search p50 < 20 ms at 100k entries",
        "goal_met": None,
    }
    big = [r for r in rows if r["entries"] >= 100_000]
    if big:
        report["goal_met"] = all(r["search_p50_ms"] < 20 for r in big)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    table = Table(title="llmos bench memory (archival memory through the kernel; times in ms)")
    for col in (
        "entries",
        "put p50/p99",
        "fill/s (embed %)",
        "search p50/p99",
        "embed p50",
        "scan p50/p99",
        "filtered p50",
        "search/s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r['entries']:,}",
            f"{r['put_p50_ms']}/{r['put_p99_ms']}",
            f"{r['fill_entries_per_s']} ({r['fill_embed_share']:.0%})",
            f"{r['search_p50_ms']}/{r['search_p99_ms']}",
            f"{r['search_embed_p50_ms']}",
            f"{r['search_scan_p50_ms']}/{r['search_scan_p99_ms']}",
            f"{r['filtered_p50_ms']}",
            f"{r['search_per_s']}",
        )
    Console().print(table)
    err.print(
        f"kernel RSS {rss / 2**20:.0f} MiB; goal: {report['goal']} -> "
        + (
            "met"
            if report["goal_met"]
            else "not met"
            if report["goal_met"] is False
            else "not measured"
        )
    )
    return 0
