"""Who may connect over TCP: the CURVE client registry and the ZAP handler.

TCP endpoints speak CurveZMQ with the kernel's key pair (``syscalls/curve.py``): every
frame is encrypted and authenticated, and a peer whose public key the admin has not
added (``llmos clients add NAME KEY``) is refused during the handshake, before any frame
reaches the dispatcher. The ZAP handler is pyzmq's :class:`ThreadAuthenticator`: it runs
on a thread of its own, so a flood of handshakes never touches the kernel's loop.

The registry is ``STATE/curve-clients.json`` (0600, replaced atomically); the handler
re-reads it when its mtime changes, so adding or revoking a key needs no restart (a
revoked client's open connection lives on until it reconnects: revoke, then restart the
kernel to cut it at once). These keys are not the gateway's HTTP API keys
(``llmos keys``, ``gateway-keys.json``): those authenticate HTTP requests to
``llmos gateway``; these authenticate ZeroMQ peers of the kernel itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from syscalls.curve import KeyPair, is_key

log = logging.getLogger("llmos.kernel")

#: Most clients the registry holds.
MAX_CLIENTS = 4096
#: A refused key is logged at most once per this many seconds (and at most this many
#: distinct keys are remembered between logs; the others are only counted).
DENY_LOG_INTERVAL_S = 60.0
_DENY_KEYS = 1024

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def clients_path(state: Path) -> Path:
    return state / "curve-clients.json"


class ClientRegistry:
    """The admitted client keys by name, in the state dir's ``curve-clients.json``."""

    def __init__(self, state: Path) -> None:
        self.path = clients_path(state)

    def load(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path} is unreadable ({exc}); fix or remove it") from None
        clients = data.get("clients") if isinstance(data, dict) else None
        if not isinstance(clients, dict):
            raise ValueError(f"{self.path} has no 'clients' map; fix or remove it")
        return clients

    def _save(self, clients: dict[str, dict[str, Any]]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"clients": clients}, f, indent=1)
        os.replace(tmp, self.path)

    def add(self, name: str, key: str) -> None:
        """Admit ``key`` as ``name``; ValueError for a bad name or key, a taken name, or a
        key already admitted under another name."""
        if not NAME.fullmatch(name):
            raise ValueError(f"client name {name!r}: 1-64 letters, digits or _.@- characters")
        if not is_key(key):
            raise ValueError(
                f"{key[:60]!r} is not a CURVE public key (40 Z85 characters, as `llmos keygen` "
                "prints)"
            )
        clients = self.load()
        if name in clients:
            raise ValueError(f"a client named {name!r} exists; revoke it first")
        for other, rec in clients.items():
            if rec.get("key") == key:
                raise ValueError(f"that key is already admitted as {other!r}")
        if len(clients) >= MAX_CLIENTS:
            raise ValueError(f"the registry is full ({MAX_CLIENTS} clients); revoke some")
        clients[name] = {"key": key, "added": round(time.time(), 3)}
        self._save(clients)

    def revoke(self, name: str) -> None:
        clients = self.load()
        if name not in clients:
            raise ValueError(f"no client named {name!r} (see `llmos clients list`)")
        del clients[name]
        self._save(clients)


class _Provider:
    """ZAP's credentials callback (the authenticator's thread): is this key admitted?"""

    def __init__(self, registry: ClientRegistry, extra: set[str]) -> None:
        self.registry = registry
        self.extra = extra  # admitted for this run only (the runtime dir's local pair)
        self._keys: frozenset[str] = frozenset()
        self._mtime: int | None = -1
        self._denied: dict[str, int] = {}
        self._denied_total = 0
        self._last_log = 0.0
        self._lock = threading.Lock()

    def keys(self) -> frozenset[str]:
        try:
            mtime: int | None = self.registry.path.stat().st_mtime_ns
        except OSError:
            mtime = None
        if mtime != self._mtime:
            try:
                clients = self.registry.load()
                self._keys = frozenset(
                    str(r.get("key")) for r in clients.values() if isinstance(r, dict)
                )
            except ValueError as exc:
                log.error("CURVE clients: %s; admitting only the local key", exc)
                self._keys = frozenset()
            self._mtime = mtime
        return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode(errors="replace")
        if text in self.extra or text in self.keys():
            return True
        self._deny(text)
        return False

    def _deny(self, key: str) -> None:
        """Log refused keys once per interval: how many handshakes, which keys (public
        keys are not secrets), never one line per attempt."""
        with self._lock:
            self._denied_total += 1
            if key in self._denied or len(self._denied) < _DENY_KEYS:
                self._denied[key] = self._denied.get(key, 0) + 1
            now = time.monotonic()
            if now - self._last_log < DENY_LOG_INTERVAL_S:
                return
            shown = ", ".join(f"{k} ×{n}" for k, n in list(self._denied.items())[:5])
            more = len(self._denied) - 5
            log.warning(
                "refused %d CURVE handshakes from %d unknown keys (%s%s); admit one with "
                "`llmos clients add NAME KEY`",
                self._denied_total,
                len(self._denied),
                shown,
                f", {more} more" if more > 0 else "",
            )
            self._denied, self._denied_total, self._last_log = {}, 0, now


class CurveGuard:
    """The ZAP handler of one kernel: started before any CURVE endpoint is bound."""

    def __init__(self, ctx: zmq.Context, state: Path, extra_keys: set[str]) -> None:  # type: ignore[type-arg]
        self.provider = _Provider(ClientRegistry(state), extra_keys)
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("llmos.zap"))
        logging.getLogger("llmos.zap").setLevel(logging.WARNING)

    def start(self) -> None:
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self.provider)

    def stop(self) -> None:
        self._auth.stop()


class ServerCurve:
    """A kernel's CURVE set-up: its key pair, which endpoints use it, who may connect."""

    def __init__(
        self, pair: KeyPair, state: Path, endpoints: set[str], local_keys: set[str]
    ) -> None:
        self.pair = pair
        self.state = state
        self.endpoints = endpoints
        self.local_keys = local_keys
        self.guard: CurveGuard | None = None

    def start(self, ctx: zmq.Context) -> None:  # type: ignore[type-arg]
        """Start the ZAP handler in ``ctx`` (before the first CURVE bind)."""
        self.guard = CurveGuard(ctx, self.state, self.local_keys)
        self.guard.start()

    def apply(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        """Make the endpoints bound from now on CURVE servers."""
        sock.curve_secretkey = self.pair.secret.encode()
        sock.curve_publickey = self.pair.public.encode()
        sock.curve_server = True

    def stop(self) -> None:
        if self.guard is not None:
            self.guard.stop()
            self.guard = None
