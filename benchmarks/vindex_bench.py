"""Measure the archival-memory vector index before choosing it.

Compares the project's exact brute-force index (``kernel.vindex.VectorIndex``: one
float32 BLAS matrix-vector product per namespace) with HNSW indexes from PyPI
(``hnswlib``, ``usearch``; skipped when not installed, they are not project
dependencies) on random unit vectors of dimension 384 (``--data clustered``: a mixture
of clusters, for meaningful HNSW recall), at 1k, 10k and 100k entries:

* search latency p50/p99 for k=10 (one query at a time, as the kernel asks),
* add throughput (one bulk add, as the kernel does at startup; and single adds),
* memory (array bytes for the exact index, resident-set growth for the libraries),
* recall@10 against the exact answer,
* for the exact index, search with a ``candidates`` filter (a metadata pre-filter)
  naming 1%, 10%, 25% and 50% of the entries.

Optionally (``--embed``) also the sentence-embedding throughput of ``kernel.embed``
(short ~15-word texts, embed() called with 1, 32 and 256 texts).

Random vectors are the hardest case for HNSW recall (no cluster structure); real
sentence embeddings usually recall better at the same settings.

Usage::

    .venv/bin/python benchmarks/vindex_bench.py                 # table
    .venv/bin/python benchmarks/vindex_bench.py --json          # JSON rows
    .venv/bin/python benchmarks/vindex_bench.py --sizes 1000 10000 --no-ann
    .venv/bin/python benchmarks/vindex_bench.py --blas-threads 1 --embed
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=300, help="queries per size (latency, recall)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--no-ann", action="store_true", help="only the exact index")
    p.add_argument(
        "--libs", nargs="+", default=["hnswlib", "usearch"], help="ANN libraries to compare"
    )
    p.add_argument("--hnsw-m", type=int, default=16, help="HNSW links per node (M)")
    p.add_argument("--ef-construction", type=int, default=128)
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 128])
    p.add_argument(
        "--blas-threads",
        type=int,
        default=None,
        help="OPENBLAS_NUM_THREADS/OMP_NUM_THREADS for this run (default: the library's)",
    )
    p.add_argument("--embed", action="store_true", help="also measure kernel.embed throughput")
    p.add_argument(
        "--data",
        choices=["random", "clustered"],
        default="random",
        help="uniform random unit vectors (no neighbour structure: the worst case for HNSW "
        "recall) or a mixture of clusters (n/50 centres, points at cosine ~0.8 to theirs), "
        "closer to sentence embeddings",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--render", metavar="FILE", help="print the table of a saved --json run")
    return p.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.blas_threads:
    # Must be set before numpy (OpenBLAS) is imported.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.blas_threads)

import numpy as np  # noqa: E402
import psutil  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernel.vindex import VectorIndex  # noqa: E402

Row = dict[str, Any]
#: Vocabulary of the random ~15-word sentences of the embedding benchmark.
WORDS = (
    "the", "a", "memory", "agent", "kernel", "process", "model", "token", "user", "system",
    "file", "note", "task", "plan", "result", "error", "search", "vector", "answer", "question",
    "meeting", "project", "report", "data", "cat", "market", "price", "server", "cache",
    "request", "reply", "schedule", "deadline", "summary", "idea",
)  # fmt: skip


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def clustered_vectors(
    rng: np.random.Generator, n: int, dim: int, centres: np.ndarray
) -> np.ndarray:
    """Points around random ``centres`` (noise of norm ~0.75: cosine ~0.8 to the centre)."""
    picked = centres[rng.integers(0, len(centres), size=n)]
    v = picked + rng.standard_normal((n, dim), dtype=np.float32) * (0.75 / np.sqrt(dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def timed(fn: Callable[[Any], object], inputs: Any, repeat: int, warmup: int = 3) -> list[float]:
    """Wall times (ms) of ``repeat`` calls ``fn(inputs[i])`` (cycling), after ``warmup`` more."""
    out = []
    for i in range(-warmup, repeat):
        t0 = time.perf_counter()
        fn(inputs[i % len(inputs)])
        if i >= 0:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q))


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def exact_top(data: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    scores = queries @ data.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return [set(row.tolist()) for row in top]


def recall(found: list[list[int]], truth: list[set[int]], k: int) -> float:
    return float(np.mean([len(set(f) & t) / k for f, t in zip(found, truth, strict=True)]))


def bench_exact(
    data: np.ndarray, queries: np.ndarray, k: int, rng: np.random.Generator
) -> list[Row]:
    n, dim = data.shape
    ids = list(range(n))
    index = VectorIndex(dim)
    t0 = time.perf_counter()
    index.add("bench", ids, data)
    bulk_s = time.perf_counter() - t0
    # Single adds (a new memory at a time) onto the full index, then remove them again.
    extra = unit_vectors(rng, 200, dim)
    t0 = time.perf_counter()
    for j in range(200):
        index.add("bench", [n + j], extra[j : j + 1])
    single_add_us = (time.perf_counter() - t0) / 200 * 1e6
    t0 = time.perf_counter()
    for j in range(200):
        index.remove("bench", [n + j])
    single_remove_us = (time.perf_counter() - t0) / 200 * 1e6

    lat = timed(lambda q: index.search(["bench"], q, k), queries, len(queries))
    found = [[i for i, _, _ in index.search(["bench"], q, k)] for q in queries[:100]]
    rec = recall(found, exact_top(data, queries[:100], k), k)
    row: Row = {
        "index": "exact (numpy f32)",
        "n": n,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "add_per_s": n / bulk_s,
        "single_add_us": single_add_us,
        "single_remove_us": single_remove_us,
        "memory_mb": index.nbytes() / 2**20,
        "recall_at_10": rec,
    }
    rows = [row]
    # The raw products the index could use: BLAS gemv (threads as OpenBLAS decides) and
    # numpy's single-threaded einsum loop (what the index uses).
    for name, product in (
        ("raw BLAS gemv (m @ q)", lambda q: data @ q),
        ("raw einsum ij,j->i", lambda q: np.einsum("ij,j->i", data, q)),
    ):
        lat_raw = timed(product, queries, len(queries))
        rows.append({"index": name, "n": n, "p50_ms": pct(lat_raw, 50), "p99_ms": pct(lat_raw, 99)})
    for fraction in (0.01, 0.1, 0.25, 0.5):
        cands = set(rng.choice(n, size=max(1, int(fraction * n)), replace=False).tolist())
        lat_f = timed(
            lambda q, c=cands: index.search(["bench"], q, k, c),
            queries,
            max(20, len(queries) // 3),
        )
        rows.append(
            {
                "index": f"exact, candidates {fraction:.0%}",
                "n": n,
                "p50_ms": pct(lat_f, 50),
                "p99_ms": pct(lat_f, 99),
            }
        )
    return rows


def bench_hnswlib(
    data: np.ndarray, queries: np.ndarray, k: int, args: argparse.Namespace
) -> list[Row]:
    import hnswlib

    n, dim = data.shape
    before = rss()
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=n, ef_construction=args.ef_construction, M=args.hnsw_m)
    t0 = time.perf_counter()
    index.add_items(data, np.arange(n), num_threads=2)
    build_s = time.perf_counter() - t0
    memory = (rss() - before) / 2**20
    truth = exact_top(data, queries, k)
    rows = []
    for ef in args.ef_search:
        index.set_ef(max(ef, k))
        lat = timed(lambda q: index.knn_query(q, k=k, num_threads=1), queries, len(queries))
        labels, _ = index.knn_query(queries, k=k, num_threads=1)
        rows.append(
            {
                "index": f"hnswlib M={args.hnsw_m} ef={ef}",
                "n": n,
                "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99),
                "add_per_s": n / build_s,
                "memory_mb": memory,
                "recall_at_10": recall(labels.tolist(), truth, k),
            }
        )
    return rows


def bench_usearch(
    data: np.ndarray, queries: np.ndarray, k: int, args: argparse.Namespace
) -> list[Row]:
    from usearch.index import Index

    n, dim = data.shape
    truth = exact_top(data, queries, k)
    rows = []
    for dtype in ("f32", "f16"):
        before = rss()
        index = Index(
            ndim=dim,
            metric="cos",
            dtype=dtype,
            connectivity=args.hnsw_m,
            expansion_add=args.ef_construction,
        )
        t0 = time.perf_counter()
        index.add(np.arange(n), data, threads=2)
        build_s = time.perf_counter() - t0
        memory = (rss() - before) / 2**20
        for ef in args.ef_search:
            index.expansion_search = max(ef, k)
            lat = timed(lambda q, ix=index: ix.search(q, k, threads=1), queries, len(queries))
            found = [index.search(q, k, threads=1).keys.tolist() for q in queries]
            rows.append(
                {
                    "index": f"usearch {dtype} M={args.hnsw_m} ef={ef}",
                    "n": n,
                    "p50_ms": pct(lat, 50),
                    "p99_ms": pct(lat, 99),
                    "add_per_s": n / build_s,
                    "memory_mb": memory,
                    "recall_at_10": recall(found, truth, k),
                }
            )
        del index
    return rows


def bench_embed() -> list[Row]:
    from kernel.embed import Embedder

    rng = np.random.default_rng(1)
    words = list(WORDS)

    def sentence() -> str:
        return " ".join(rng.choice(words, size=15).tolist()).capitalize() + "."

    embedder = Embedder()
    t0 = time.perf_counter()
    embedder.load()
    rows: list[Row] = [{"index": "embed: load", "n": 0, "p50_ms": (time.perf_counter() - t0) * 1e3}]
    for batch, calls in ((1, 60), (32, 6), (256, 2)):
        texts = [[sentence() for _ in range(batch)] for _ in range(calls)]
        lat = timed(embedder.embed, texts, calls, warmup=1)
        rows.append(
            {
                "index": f"embed: {batch} texts per call",
                "n": batch,
                "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99),
                "sentences_per_s": batch * len(lat) / (sum(lat) / 1e3),
            }
        )
    return rows


COLUMNS = [
    ("index", "index", "{}"),
    ("n", "n", "{:,}"),
    ("p50_ms", "p50 ms", "{:.3f}"),
    ("p99_ms", "p99 ms", "{:.3f}"),
    ("add_per_s", "add/s (bulk)", "{:,.0f}"),
    ("single_add_us", "add 1 us", "{:.0f}"),
    ("single_remove_us", "remove 1 us", "{:.0f}"),
    ("memory_mb", "memory MB", "{:.1f}"),
    ("recall_at_10", "recall@10", "{:.3f}"),
    ("sentences_per_s", "sentences/s", "{:.1f}"),
]


def table(rows: list[Row]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    cells = [[c[1] for c in cols]]
    for r in rows:
        cells.append([c[2].format(r[c[0]]) if c[0] in r else "" for c in cols])
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    lines = []
    for j, line in enumerate(cells):
        lines.append(
            "  ".join(
                s.ljust(w) if i == 0 else s.rjust(w)
                for i, (s, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        print(json.dumps(saved["meta"]))
        print(table(saved["rows"]))
        return
    rng = np.random.default_rng(args.seed)
    rows: list[Row] = []
    libs: list[tuple[str, Callable[..., list[Row]]]] = []
    if not args.no_ann:
        for name, fn in (("hnswlib", bench_hnswlib), ("usearch", bench_usearch)):
            if name not in args.libs:
                continue
            try:
                __import__(name)
            except ImportError:
                print(f"({name} is not installed: skipped)", file=sys.stderr)
            else:
                libs.append((name, fn))
    for n in args.sizes:
        if args.data == "clustered":
            centres = unit_vectors(rng, max(1, n // 50), args.dim)
            data = clustered_vectors(rng, n, args.dim, centres)
            queries = clustered_vectors(rng, args.queries, args.dim, centres)
        else:
            data = unit_vectors(rng, n, args.dim)
            queries = unit_vectors(rng, args.queries, args.dim)
        rows += bench_exact(data, queries, args.k, rng)
        print(f"... n={n:,}: exact done", file=sys.stderr, flush=True)
        for name, fn in libs:
            rows += fn(data, queries, args.k, args)
            print(f"... n={n:,}: {name} done", file=sys.stderr, flush=True)
    if args.embed:
        rows += bench_embed()
    meta = {
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "blas_threads": args.blas_threads,
        "data": args.data,
        "dim": args.dim,
        "k": args.k,
        "queries": args.queries,
        "numpy": np.__version__,
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        print(json.dumps(meta))
        print(table(rows))


if __name__ == "__main__":
    assert ARGS is not None
    main(ARGS)
