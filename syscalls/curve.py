"""CURVE keys for TCP endpoints (ZeroMQ's CurveZMQ: Curve25519 key exchange, then every
frame encrypted and authenticated), shared by the kernel, the SDK and the operator's tools.

A key is 40 Z85 characters. A key pair lives in one ZPL file (the format of pyzmq's
``zmq.auth.create_certificates``: ``public-key`` and ``secret-key``), mode 0600.

Where things are:

* the kernel's pair: ``STATE/curve/server.key_secret`` (made on the first start);
* the clients it admits: ``STATE/curve-clients.json`` (``llmos clients add|list|revoke``);
* per start, in the runtime dir (0700): ``kernel.server_key`` (its public key) and
  ``client.key_secret`` (a pair the kernel admits for as long as it runs), so the kernel's
  own user reaches a local TCP kernel with no setup;
* a remote client: ``LLMOS_SERVER_KEY`` (or ``LLMOS_SERVER_KEY_FILE``) pins the kernel's
  public key; ``LLMOS_CURVE_SECRET_KEY_FILE`` (a file ``llmos keygen`` wrote) or
  ``LLMOS_CURVE_PUBLIC_KEY`` + ``LLMOS_CURVE_SECRET_KEY`` hold its own pair.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


def is_key(text: str) -> bool:
    """A Z85-encoded 32-byte CURVE key."""
    return bool(_Z85_KEY.fullmatch(text))


@dataclass(frozen=True)
class KeyPair:
    public: str
    secret: str


def new_pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode(), secret.decode())


def write_pair(path: Path, pair: KeyPair) -> None:
    """Write ``pair`` to ``path`` (0600, atomic replace); ``path.key`` beside it gets the
    public half alone (a ZPL file too: what to hand to the other side)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    body = f'metadata\ncurve\n    public-key = "{pair.public}"\n'
    for target, text in (
        (path, body + f'    secret-key = "{pair.secret}"\n'),
        (path.with_suffix(".key"), body),
    ):
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)


def read_pair(path: Path) -> KeyPair:
    """The pair in ``path``; ValueError saying what is wrong."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the CURVE key pair in {path}: {exc}") from None
    if secret is None or not is_key(public.decode()) or not is_key(secret.decode()):
        raise ValueError(
            f"{path} holds no CURVE secret key (make a pair with `llmos keygen {path}`)"
        )
    return KeyPair(public.decode(), secret.decode())


def server_pair(state: Path) -> KeyPair:
    """The kernel's pair in ``state``, made (0600) if it has none yet."""
    path = state / "curve" / "server.key_secret"
    if not path.exists():
        write_pair(path, new_pair())
    return read_pair(path)


def is_loopback(endpoint: str) -> bool:
    """A ``tcp://`` endpoint bound to a loopback address only (``localhost`` counts;
    ``*`` and other names do not)."""
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ClientCurve:
    """What a client needs to talk CURVE to one kernel."""

    server: str  # the kernel's public key, pinned
    pair: KeyPair  # the client's own
    source: str  # where the keys came from (for error messages)

    def apply(self, sock: zmq.Socket) -> None:  # type: ignore[type-arg]
        sock.curve_serverkey = self.server.encode()
        sock.curve_publickey = self.pair.public.encode()
        sock.curve_secretkey = self.pair.secret.encode()


def client_curve(endpoint: str, run: Path) -> ClientCurve | None:
    """The CURVE keys for ``endpoint`` (None for ipc, and for TCP with none configured:
    plain ZMTP, which only an ``--insecure`` loopback kernel accepts); ValueError when
    they are configured but unusable."""
    if not endpoint.startswith("tcp://"):
        return None
    server = os.environ.get("LLMOS_SERVER_KEY", "").strip()
    if not server and (file := os.environ.get("LLMOS_SERVER_KEY_FILE")):
        try:
            server = zmq.auth.load_certificate(file)[0].decode()
        except (OSError, ValueError) as exc:
            raise ValueError(f"LLMOS_SERVER_KEY_FILE={file}: {exc}") from None
    source = "LLMOS_SERVER_KEY"
    pair: KeyPair | None = None
    if file := os.environ.get("LLMOS_CURVE_SECRET_KEY_FILE"):
        pair = read_pair(Path(file))
    elif (pub := os.environ.get("LLMOS_CURVE_PUBLIC_KEY")) and (
        sec := os.environ.get("LLMOS_CURVE_SECRET_KEY")
    ):
        if not (is_key(pub) and is_key(sec)):
            raise ValueError(
                "LLMOS_CURVE_PUBLIC_KEY / LLMOS_CURVE_SECRET_KEY must be 40-character Z85 keys "
                "(make a pair with `llmos keygen`)"
            )
        pair = KeyPair(pub, sec)
    if not server and _local_kernel(endpoint, run):
        # The kernel's own user, on the kernel's machine: the runtime dir's keys.
        try:
            server = (run / "kernel.server_key").read_text().strip()
            pair = pair or read_pair(run / "client.key_secret")
            source = f"the runtime dir {run}"
        except (OSError, ValueError):
            return None
    if not server:
        return None
    if not is_key(server):
        raise ValueError(
            f"{source}: {server[:60]!r} is not a CURVE key (40 Z85 characters; "
            "`llmos kernel key` on the kernel's machine prints it)"
        )
    if pair is None:
        raise ValueError(
            "a server key is pinned but this client has no key pair: make one with "
            "`llmos keygen FILE`, set LLMOS_CURVE_SECRET_KEY_FILE=FILE and have the "
            "kernel's admin run `llmos clients add NAME PUBLIC_KEY`"
        )
    return ClientCurve(server, pair, source)


def _local_kernel(endpoint: str, run: Path) -> bool:
    try:
        return (run / "kernel.endpoint").read_text().strip() == endpoint or endpoint in (
            run / "kernel.endpoints"
        ).read_text().split()
    except OSError:
        return False
