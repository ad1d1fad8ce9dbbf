"""``llmos bench state``: the cost of encryption at rest, side by side in one run.

The kernel's own :class:`kernel.store.Store` (its thread, WAL, ``synchronous=NORMAL``,
one transaction per write, as syscalls commit) on a throwaway file, three ways:

* ``plain``: SQLite as without ``--encrypt-state``;
* ``sqlcipher``: the whole database and WAL encrypted (what ``--encrypt-state`` does);
* ``aes-gcm column``: plain SQLite, each message's text encrypted with AES-256-GCM
  (``cryptography``) before it is stored — the alternative the issue names; its FTS index
  would hold ciphertext (no full-text recall), so it is measured only for comparison.

Writes: a 1 KiB message into ``recall`` (its FTS5 trigger included) per transaction.
Reads: a message by id (and decrypted, for the column variant). Rounds alternate the
variants so machine noise spreads over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from kernel.store import Store


def add_parser(bsub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bp = bsub.add_parser("state", help="encryption at rest: plain vs SQLCipher vs AES-GCM column")
    bp.add_argument("--writes", type=int, default=2000, help="writes per variant and round")
    bp.add_argument("--reads", type=int, default=5000, help="reads per variant and round")
    bp.add_argument("--rounds", type=int, default=3)
    bp.add_argument("--json", action="store_true", help="print JSON")


def _variant(name: str, folder: Path, key: bytes) -> tuple[Store, Any]:
    aead = None
    if name == "aes-gcm column":
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aead = AESGCM(key)
    store = Store(folder / f"{name.replace(' ', '-')}.db", key if name == "sqlcipher" else None)
    return store, aead


def _run_round(store: Store, aead: Any, writes: int, reads: int, text: str) -> tuple[float, float]:
    def put(conn: Any, body: str) -> int:
        if aead is not None:
            nonce = os.urandom(12)
            body = (nonce + aead.encrypt(nonce, body.encode(), None)).hex()
        cur = conn.execute(
            "INSERT INTO recall (ns, pid, role, content, ts) VALUES ('b', 1, 'user', ?, ?)",
            (body, time.time()),
        )
        return int(cur.lastrowid)

    def get(conn: Any, rid: int) -> str:
        body = conn.execute("SELECT content FROM recall WHERE id = ?", (rid,)).fetchone()[0]
        if aead is not None:
            raw = bytes.fromhex(body)
            body = aead.decrypt(raw[:12], raw[12:], None).decode()
        return str(body)

    t0 = time.perf_counter()
    ids = [store.call_sync(put, text) for _ in range(writes)]
    t1 = time.perf_counter()
    for i in range(reads):
        if store.call_sync(get, ids[i % len(ids)]) != text:
            raise RuntimeError("a read returned other text than was written")
    t2 = time.perf_counter()
    return writes / (t1 - t0), reads / (t2 - t1)


def bench_state(args: argparse.Namespace) -> int:
    names = ["plain", "sqlcipher", "aes-gcm column"]
    text = ("a message of a conversation, " * 40)[:1024]
    key = secrets.token_bytes(32)
    figures: dict[str, dict[str, list[float]]] = {n: {"writes": [], "reads": []} for n in names}
    with tempfile.TemporaryDirectory(prefix="llmos-bench-state-") as tmp:
        stores = {n: _variant(n, Path(tmp), key) for n in names}
        try:
            for _ in range(args.rounds):
                for n in names:
                    w, r = _run_round(*stores[n], args.writes, args.reads, text)
                    figures[n]["writes"].append(w)
                    figures[n]["reads"].append(r)
        finally:
            for store, _ in stores.values():
                store.close()
    best = {
        n: {"writes_per_s": round(max(f["writes"])), "reads_per_s": round(max(f["reads"]))}
        for n, f in figures.items()
    }
    if args.json:
        print(json.dumps({"best_of_rounds": best, "rounds": figures}))
        return 0
    base = best["plain"]
    print(f"{'variant':16} {'writes/s':>10} {'vs plain':>9} {'reads/s':>10} {'vs plain':>9}")
    for n, b in best.items():
        print(
            f"{n:16} {b['writes_per_s']:>10} {b['writes_per_s'] / base['writes_per_s']:>8.0%} "
            f"{b['reads_per_s']:>10} {b['reads_per_s'] / base['reads_per_s']:>8.0%}"
        )
    print(f"(best of {args.rounds} alternating rounds; 1 KiB messages, one transaction each)")
    return 0
