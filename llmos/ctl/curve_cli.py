"""CURVE keys for the kernel's TCP endpoints: ``llmos kernel key`` (the kernel's public
key, to pin), ``llmos keygen FILE`` (a client's key pair), ``llmos clients add NAME KEY |
list | revoke NAME`` (which client keys the kernel admits; effective at the next
handshake, no restart).

Not the gateway's ``llmos keys``: those are HTTP API keys for ``llmos gateway``; these
are ZeroMQ CURVE keys for the kernel's own ``tcp://`` endpoints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kernel.curve import ClientRegistry
from syscalls import curve, paths


def add_parsers(sub: argparse._SubParsersAction, kernel_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    kk = kernel_sub.add_parser(
        "key", help="print the kernel's CURVE public key (made if the state dir has none)"
    )
    kk.add_argument("--state-dir", type=Path, default=None, help="the kernel's state dir")
    kg = sub.add_parser(
        "keygen", help="make a CURVE key pair for a client of a kernel's tcp:// endpoint"
    )
    kg.add_argument("file", type=Path, help="where to write the pair (0600; FILE.key: public half)")
    kg.add_argument("--force", action="store_true", help="replace an existing FILE")
    cp = sub.add_parser(
        "clients",
        help="client keys the kernel admits on its tcp:// endpoints (not `llmos keys`: "
        "those are the HTTP gateway's API keys)",
    )
    cp.add_argument("--state-dir", type=Path, default=None, help="the kernel's state dir")
    csub = cp.add_subparsers(dest="ccmd", required=True)
    ca = csub.add_parser("add", help="admit a client's public key (from `llmos keygen`)")
    ca.add_argument("name", help="a name for the client (1-64 of A-Z a-z 0-9 _.@-)")
    ca.add_argument("key", help="its CURVE public key (40 Z85 characters)")
    cl = csub.add_parser("list", help="the admitted clients")
    cl.add_argument("--json", action="store_true", help="print JSON")
    cr = csub.add_parser("revoke", help="stop admitting a client (its next handshake fails)")
    cr.add_argument("name")


def _state(args: argparse.Namespace) -> Path:
    return paths.ensure_private_dir(args.state_dir or paths.state_dir())


def cmd_kernel_key(args: argparse.Namespace) -> int:
    print(curve.server_pair(_state(args)).public)
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    if args.file.exists() and not args.force:
        print(f"llmos keygen: {args.file} exists (--force to replace it)", file=sys.stderr)
        return 1
    pair = curve.new_pair()
    curve.write_pair(args.file, pair)
    print(pair.public)
    print(
        f"# secret key in {args.file} (0600). Admit it on the kernel's machine with\n"
        f"#   llmos clients add NAME {pair.public}\n"
        f"# and use it with LLMOS_CURVE_SECRET_KEY_FILE={args.file} "
        "LLMOS_SERVER_KEY=<`llmos kernel key` there>"
    )
    return 0


def cmd_clients(args: argparse.Namespace) -> int:
    registry = ClientRegistry(_state(args))
    try:
        if args.ccmd == "add":
            registry.add(args.name, args.key)
            print(f"admitted {args.name}: {args.key}")
        elif args.ccmd == "revoke":
            registry.revoke(args.name)
            print(f"revoked {args.name} (an open connection lasts until it reconnects)")
        else:
            clients = registry.load()
            if args.json:
                print(json.dumps(clients, indent=1))
            else:
                for name, rec in sorted(clients.items()):
                    added = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.get("added", 0)))
                    print(f"{name:24} {rec.get('key')}  added {added}")
                if not clients:
                    print("no clients admitted (`llmos clients add NAME PUBLIC_KEY`)")
    except ValueError as exc:
        print(f"llmos clients {args.ccmd}: {exc}", file=sys.stderr)
        return 1
    return 0
