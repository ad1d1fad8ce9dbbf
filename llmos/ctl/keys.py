"""API keys of the HTTP gateway (``llmos keys``): a key is a program's credential.

A key maps to a program: its limits become the program's quotas, its namespace the
program's memory namespace, its tool patterns the processes' capabilities, and its named
agents (a system prompt each) extra model names. Only a key's SHA-256 is stored: keys are
32 random bytes, so a fast unsalted hash cannot be brute-forced, and a lookup is one
dictionary probe. The store is one JSON file (0600) in the state dir, replaced atomically
on every change: a handful of records, readable by the operator, and the gateway reloads
it when its mtime changes, so ``create`` and ``revoke`` apply to a running gateway at once.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from syscalls import models as m
from syscalls import paths
from syscalls.errors import Errno, SyscallError

KEY_PREFIX = "llmos-"
FILE_NAME = "gateway-keys.json"


def key_hash(key: str) -> str:
    """What is stored of a key (and looked up): its SHA-256, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRecord:
    """One key's program: who it is and what it may do."""

    name: str
    hash: str
    created: float
    limits: dict[str, float] = field(default_factory=dict)
    namespace: str | None = None
    tools: list[str] | None = None
    agents: dict[str, str] = field(default_factory=dict)
    revoked: float | None = None
    nice: int = 0  # its requests' priority: X-Llmos-Priority may go from here to 19, not below


class KeyStore:
    """The keys file: ``load`` (cached by mtime), ``create``, ``revoke``, ``lookup``."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else paths.state_dir() / FILE_NAME
        self._records: dict[str, KeyRecord] = {}
        self._by_hash: dict[str, KeyRecord] = {}
        self._mtime: float | None = None

    def load(self) -> dict[str, KeyRecord]:
        """Every key record by name (re-read only when the file changed)."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            self._records, self._by_hash, self._mtime = {}, {}, None
            return self._records
        if mtime != self._mtime:
            raw = json.loads(self.path.read_text())
            self._records = {r["name"]: KeyRecord(**r) for r in raw.get("keys", [])}
            self._by_hash = {r.hash: r for r in self._records.values() if r.revoked is None}
            self._mtime = mtime
        return self._records

    def lookup(self, key: str) -> KeyRecord | None:
        """The live record of ``key``; None if unknown or revoked."""
        self.load()
        return self._by_hash.get(key_hash(key))

    def _save(self, records: dict[str, KeyRecord]) -> None:
        paths.ensure_private_dir(self.path.parent)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"keys": [asdict(r) for r in records.values()]}, f, indent=1)
        os.replace(tmp, self.path)
        self._mtime = None  # re-read on next load

    def create(
        self,
        name: str,
        limits: dict[str, float] | None = None,
        namespace: str | None = None,
        tools: list[str] | None = None,
        agents: dict[str, str] | None = None,
        nice: int = 0,
    ) -> str:
        """A new key for program ``name`` (returned once; only its hash is kept)."""
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise SyscallError.of(Errno.EINVAL, f"key name {name!r}: letters, digits, _ . - only")
        records = dict(self.load())
        if name in records and records[name].revoked is None:
            raise SyscallError.of(Errno.EINVAL, f"a key named {name!r} exists; revoke it first")
        m.Limits.model_validate(limits or {})  # EINVAL-worthy mistakes found now, not per request
        if not 0 <= nice <= 19:
            raise SyscallError.of(Errno.EINVAL, f"--nice {nice}: expected 0..19")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        records[name] = KeyRecord(
            name=name,
            hash=key_hash(key),
            created=time.time(),
            limits=dict(limits or {}),
            namespace=namespace,
            tools=tools,
            agents=dict(agents or {}),
            nice=nice,
        )
        self._save(records)
        return key

    def revoke(self, name: str) -> None:
        """Revoke the key of ``name`` (its requests get 401 from now on)."""
        records = dict(self.load())
        rec = records.get(name)
        if rec is None or rec.revoked is not None:
            raise SyscallError.of(Errno.ENOENT, f"no live key named {name!r}")
        records[name] = KeyRecord(**{**asdict(rec), "revoked": time.time()})
        self._save(records)


# -- llmos keys ---------------------------------------------------------------------------


def add_parsers(sub: Any) -> None:
    """``llmos gateway`` and ``llmos keys create|list|revoke`` on the ``llmos`` command's
    subparsers (here, not in gateway.py: building the parser must not import FastAPI)."""
    gp = sub.add_parser("gateway", help="an OpenAI-compatible HTTP gateway on the kernel")
    gp.add_argument("--listen", default="127.0.0.1:8000", metavar="HOST:PORT")
    gp.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate")
    gp.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    kp = sub.add_parser("keys", help="API keys of the HTTP gateway (each key is a program)")
    ks = kp.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create", help="create a key (printed once, stored hashed)")
    kc.add_argument("name", help="the key's program name")
    kc.add_argument("--limit", action="append", metavar="KEY=VALUE", help="program quota")
    kc.add_argument("--namespace", help="the program's memory namespace")
    kc.add_argument("--tools", help="tool patterns its processes may use, comma-separated")
    kc.add_argument(
        "--agent",
        action="append",
        metavar="NAME=SYSTEM_PROMPT",
        help="a named agent: a model name that runs with this system prompt",
    )
    kc.add_argument(
        "--nice",
        type=int,
        default=0,
        help="its requests' nice (0..19); X-Llmos-Priority may only raise it (default 0)",
    )
    kl = ks.add_parser("list", help="list keys (names and settings, never the keys)")
    kl.add_argument("--json", action="store_true")
    kr = ks.add_parser("revoke", help="revoke a key")
    kr.add_argument("name")


def cmd_keys(args: argparse.Namespace) -> int:
    from llmos.ctl.views import parse_limits

    store = KeyStore()
    if args.keys_cmd == "create":
        agents: dict[str, str] = {}
        for item in args.agent or []:
            name, sep, prompt = item.partition("=")
            if not sep or not name.strip():
                raise SyscallError.of(Errno.EINVAL, f"--agent {item!r}: expected NAME=PROMPT")
            agents[name.strip()] = prompt
        tools = [t.strip() for t in args.tools.split(",") if t.strip()] if args.tools else None
        key = store.create(
            args.name, parse_limits(args.limit), args.namespace, tools, agents, args.nice
        )
        print(key)
        print(f"key for {args.name!r} created; it is not shown again", file=sys.stderr)
        return 0
    if args.keys_cmd == "revoke":
        store.revoke(args.name)
        print(f"key {args.name!r} revoked", file=sys.stderr)
        return 0
    rows = [{k: v for k, v in asdict(r).items() if k != "hash"} for r in store.load().values()]
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        state = "revoked" if r["revoked"] else "live"
        extra = [f"limits={r['limits']}"] if r["limits"] else []
        extra += [f"namespace={r['namespace']}"] if r["namespace"] else []
        extra += [f"tools={','.join(r['tools'])}"] if r["tools"] else []
        extra += [f"agents={','.join(r['agents'])}"] if r["agents"] else []
        extra += [f"nice={r['nice']}"] if r["nice"] else []
        print(f"{r['name']}\t{state}\t{' '.join(extra)}")
    return 0
