"""Run a kernel as a daemon: lock file, admin credential, log file, signals.

``python -m kernel [--driver cpu] [--model PATH] [--listen EP]...`` runs in the
foreground; ``llmos kernel start`` starts it detached and waits until it answers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import inspect
import logging
import logging.handlers
import os
import re
import secrets
import signal
import stat
import sys
from pathlib import Path
from typing import IO, Any

import zmq

from drivers.base import Driver
from kernel.curve import ServerCurve
from kernel.kernel import Kernel
from kernel.metrics import MetricsError, metrics_address
from kernel.residency import MIN_AWAKE_S
from kernel.sandbox import SandboxConfig
from kernel.scheduler import DEFAULT_POLICY, POLICIES, make_policy
from kernel.store import StoreError
from kernel.trace import check_otlp_endpoint
from syscalls import curve, limits, paths
from syscalls import models as m
from syscalls.curve import is_loopback

log = logging.getLogger("llmos.kernel")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


class AlreadyRunning(RuntimeError):
    """Another kernel holds the lock of this runtime directory."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kernel", description="Run the llmos kernel in the foreground."
    )
    add_kernel_options(p)
    return p


def add_kernel_options(p: argparse.ArgumentParser) -> None:
    """Options shared by ``python -m kernel`` and ``llmos kernel start``."""
    p.add_argument("--driver", default="cpu", help="model driver (default: cpu)")
    p.add_argument(
        "--model",
        default=None,
        help="local Hugging Face model folder (default: packaged SmolLM2-135M-Instruct)",
    )
    p.add_argument("--model-name", default=None, help="name processes use to pick this model")
    p.add_argument(
        "--slots", type=int, default=4, help="sequences the model decodes at once (default: 4)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights dtype for the cpu driver (default: float32, fastest prefill on CPUs)",
    )
    p.add_argument(
        "--policy",
        default=DEFAULT_POLICY,
        choices=list(POLICIES),
        help=f"scheduling policy (default: {DEFAULT_POLICY})",
    )
    p.add_argument(
        "--quantum",
        type=int,
        default=None,
        help="tokens a process runs before it can be preempted (rr, priority, fair)",
    )
    p.add_argument(
        "--driver-option",
        action="append",
        default=None,
        type=driver_option,
        metavar="KEY=VALUE",
        help="driver constructor option, e.g. tokens_per_s=50 for sim (repeatable; "
        "VALUE is read as int, float, true/false, else text)",
    )
    p.add_argument(
        "--serve",
        action="append",
        default=None,
        type=serve_spec,
        metavar="SPEC",
        help="serve another model beside the first, e.g. "
        "name=fast,driver=sim,slots=64,tokens_per_s=200 or name=big,driver=vllm,model=PATH "
        "(repeatable; keys name, driver, model, slots, dtype; others are driver options)",
    )
    p.add_argument(
        "--max-procs",
        type=int,
        default=4096,
        metavar="N",
        help="size of the process table, zombies included (default: 4096); each program "
        "holds at most a quarter of it unless its max_procs limit says otherwise",
    )
    for flag, default, what in (
        ("--max-topics", limits.MAX_TOPICS, "size of the IPC topic table"),
        ("--max-ipc-bytes", limits.MAX_IPC_BYTES, "bytes all IPC mailboxes hold together"),
        ("--max-parked", limits.MAX_PARKED_CALLS, "tool calls waiting for confirmation"),
        ("--max-calls-in-flight", limits.MAX_CALLS_IN_FLIGHT, "asynchronous syscalls in flight"),
    ):
        p.add_argument(
            flag,
            type=int,
            default=default,
            metavar="N",
            help=f"{what} (default: {default}); each program holds at most a quarter unless "
            "its limits say otherwise, and the last sixteenth is the admin's",
        )
    p.add_argument(
        "--no-run-journal",
        action="store_true",
        help="do not journal detached runs' tokens (they are then lost if the kernel dies; "
        "for measuring the journal's cost)",
    )
    p.add_argument(
        "--max-loaded",
        type=int,
        default=None,
        metavar="N",
        help="most models loaded at once; the others sleep (unloaded) until a process needs "
        "one, and the least recently used idle model sleeps to make room (default: all)",
    )
    p.add_argument(
        "--min-awake",
        type=float,
        default=MIN_AWAKE_S,
        metavar="SECONDS",
        help=f"a woken model stays in at least this long while calls for it wait "
        f"(default: {MIN_AWAKE_S:g})",
    )
    p.add_argument(
        "--unsafe-python",
        action="store_true",
        help="where bubblewrap (bwrap) is missing, let the python tool run code WITHOUT "
        "isolation (it can read what the kernel's user can); default: refuse with ENOTSUP",
    )
    p.add_argument(
        "--mcp",
        action="append",
        default=None,
        type=mcp_spec,
        metavar="NAME=COMMAND|URL",
        help="mount an MCP server: its tools become NAME__TOOL; a command line runs as a "
        "stdio server (the kernel's child, restarted if it dies), an http(s):// URL is "
        "streamable HTTP (repeatable; trusted code: it runs as the kernel's user)",
    )
    p.add_argument(
        "--mcp-env",
        action="append",
        default=None,
        metavar="NAME:KEY[=VALUE]",
        help="an environment variable for the stdio MCP server NAME, set over its clean "
        "environment; NAME:KEY alone takes KEY's value from the kernel's own environment, "
        "so a secret need not be on the command line (repeatable; values are never shown)",
    )
    p.add_argument(
        "--mcp-header",
        action="append",
        default=None,
        metavar="'NAME:Header: value'",
        help="a header sent to the HTTP MCP server NAME with every request (repeatable)",
    )
    p.add_argument(
        "--mcp-bearer-file",
        action="append",
        default=None,
        metavar="NAME:FILE",
        help="send the HTTP MCP server NAME 'Authorization: Bearer TOKEN', TOKEN read from FILE",
    )
    p.add_argument(
        "--mcp-bearer-env",
        action="append",
        default=None,
        metavar="NAME:VAR",
        help="the same with TOKEN from the kernel's environment variable VAR",
    )
    p.add_argument(
        "--trace",
        choices=["on", "off"],
        default="on",
        help="a span per syscall in a trace per program, written to the state dir's "
        "traces/ (bounded, rotated; `llmos trace`) (default: on; the loop pays ~1 µs a call, its own thread ~7 µs)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=None,
        metavar="URL",
        help="also export the spans to this OTLP/HTTP collector (Jaeger, Tempo, the "
        "OpenTelemetry Collector), e.g. http://127.0.0.1:4318 (/v1/traces is added to a bare address)",
    )
    p.add_argument(
        "--metrics",
        default=None,
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST default 127.0.0.1; "
        "no authentication, so keep it on loopback unless a firewall guards it)",
    )
    p.add_argument(
        "--listen",
        action="append",
        default=None,
        metavar="ENDPOINT",
        help="endpoint to serve, e.g. tcp://127.0.0.1:7077 (repeatable; default: ipc socket "
        "in the runtime dir); tcp:// endpoints are CURVE-encrypted and admit only the client "
        "keys of `llmos clients add`",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="serve tcp:// endpoints as plain ZMTP (no encryption, no client keys); "
        "refused unless every tcp:// endpoint is a loopback address",
    )
    p.add_argument(
        "--encrypt-state",
        action="store_true",
        help="encrypt the state database and its WAL (SQLCipher, AES-256): every context, "
        "message, memory text and vector, file version and the search index; the key is "
        "64 hex characters from --state-key-file or $LLMOS_STATE_KEY",
    )
    p.add_argument(
        "--state-key-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the --encrypt-state key (64 hex characters; the file must be 0600), e.g. made "
        "with `openssl rand -hex 32 > FILE; chmod 600 FILE`",
    )
    p.add_argument(
        "--fs-versions",
        type=int,
        default=limits.MAX_FS_VERSIONS,
        metavar="N",
        help=f"versions kept per file (1..{limits.MAX_FS_VERSIONS}; default {limits.MAX_FS_VERSIONS})",
    )
    p.add_argument(
        "--fs-history-bytes",
        type=int,
        default=None,
        metavar="BYTES",
        help="bytes of past file versions one area keeps (default: what its quota leaves "
        "beside its live files; oldest pruned first)",
    )
    p.add_argument(
        "--runtime-dir",
        type=Path,
        default=None,
        help="socket, lock and credentials (default: $LLMOS_RUNTIME_DIR or /tmp/llmos-$UID)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="log and state (default: $LLMOS_STATE_DIR or ~/.local/state/llmos)",
    )


def driver_option(text: str) -> str:
    """argparse type of ``--driver-option``: ``KEY=VALUE`` with an identifier KEY."""
    key, eq, _ = text.partition("=")
    if not eq or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. tokens_per_s=50), got {text!r}")
    return text


def parse_option_value(value: str) -> int | float | bool | str:
    """A ``--driver-option`` value: int, then float, then true/false, else the text."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def driver_options(items: list[str] | None) -> dict[str, int | float | bool | str]:
    """``["KEY=VALUE", ...]`` -> keyword arguments for the driver's constructor."""
    return {
        key: parse_option_value(value) for key, _, value in (i.partition("=") for i in items or [])
    }


#: ``--serve`` keys that are not driver constructor options.
_SERVE_KEYS = ("name", "driver", "model")


def serve_spec(text: str) -> dict[str, str]:
    """argparse type of ``--serve``: comma-separated ``KEY=VALUE`` with ``name`` and
    ``driver`` required."""
    spec: dict[str, str] = {}
    for item in text.split(","):
        key, eq, value = item.strip().partition("=")
        if not eq or not key.isidentifier() or not value:
            raise argparse.ArgumentTypeError(
                f"expected KEY=VALUE pairs separated by commas (e.g. name=fast,driver=sim,slots=8), got {item!r}"
            )
        if key in spec:
            raise argparse.ArgumentTypeError(f"{key} is given twice in {text!r}")
        spec[key] = value
    missing = [k for k in ("name", "driver") if k not in spec]
    if missing:
        raise argparse.ArgumentTypeError(
            f"--serve {text!r} lacks {' and '.join(missing)} (e.g. name=fast,driver=sim)"
        )
    if not re.fullmatch(r"[A-Za-z0-9_.:@+-]{1,64}", spec["name"]):
        raise argparse.ArgumentTypeError(
            f"model name {spec['name']!r} must be 1-64 letters, digits or _.:@+- characters"
        )
    return spec


def mcp_spec(text: str) -> tuple[str, str]:
    """argparse type of ``--mcp``: ``NAME=COMMAND|URL`` with an MCP server name."""
    from kernel.mcp import parse_target

    name, eq, target = text.partition("=")
    if not eq or not re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", name) or len(name) > 24:
        raise argparse.ArgumentTypeError(
            f"expected NAME=COMMAND or NAME=URL with NAME 1-24 of a-z, 0-9 and single _ "
            f"(e.g. time='python -m mcp_server_time'), got {text!r}"
        )
    try:
        parse_target(target)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--mcp {name}: {exc}") from None
    return name, target


def mcp_mounts(args: argparse.Namespace, environ: Any) -> list[m.McpAddArgs]:
    """The ``--mcp`` servers with their ``--mcp-env``, ``--mcp-header`` and
    ``--mcp-bearer-*`` entries, checked as ``mcp.add`` checks them; ValueError naming the
    option (and a variable or header name, never a value)."""
    from pydantic import ValidationError

    from kernel import mcp
    from syscalls import codec

    specs: dict[str, dict[str, Any]] = {}
    for name, target in getattr(args, "mcp", None) or []:
        if name in specs:
            raise ValueError("two --mcp servers have the same NAME: give each its own")
        specs[name] = {"name": name, "target": target, "env": {}, "headers": {}}

    def entries(option: str) -> list[tuple[str, str]]:
        out = []
        for text in getattr(args, option.replace("-", "_"), None) or []:
            name, colon, rest = text.partition(":")
            if not colon or name not in specs:
                raise ValueError(
                    f"--{option}: expected NAME:... with NAME one of the --mcp servers "
                    f"({', '.join(specs) or 'none given'})"
                )
            out.append((name, rest))
        return out

    sources: list[tuple[str, str, Any]] = [
        ("mcp-env", "env", lambda text: mcp.env_entry(text, environ)),
        ("mcp-header", "headers", mcp.header_entry),
        ("mcp-bearer-file", "headers", lambda path: mcp.bearer(mcp.secret_file(path))),
        ("mcp-bearer-env", "headers", lambda var: mcp.bearer(mcp.env_value(var, environ))),
    ]
    for option, kind, read in sources:
        for name, rest in entries(option):
            try:
                key, value = read(rest)
            except ValueError as exc:
                raise ValueError(f"--{option} {name}: {exc}") from None
            specs[name][kind][key] = value
    mounts = []
    for name, spec in specs.items():
        try:
            mounts.append(m.McpAddArgs.model_validate(spec))
        except ValidationError as exc:
            raise ValueError(f"--mcp {name}: {codec.describe_validation(exc)}") from None
    return mounts


def make_model_driver(driver: str, model: str | None, options: dict[str, object]) -> Driver:
    """``driver`` for ``model`` with constructor ``options``; a ValueError naming the
    drivers or options it accepts when they are wrong."""
    from drivers import DRIVERS, make_driver

    if driver not in DRIVERS:
        raise ValueError(f"unknown driver {driver!r}; choose from {', '.join(DRIVERS)}")
    try:
        return make_driver(driver, model, **options)
    except TypeError as exc:
        params = inspect.signature(DRIVERS[driver].__init__).parameters
        accepted = ", ".join(n for n in params if n not in ("self", "model"))
        raise ValueError(
            f"the {driver} driver rejected its options ({exc}); it accepts: {accepted}"
        ) from None


def build_driver(args: argparse.Namespace) -> Driver:
    """The first model's driver, from ``--driver``, ``--model``, ``--slots``, ``--dtype`` and
    ``--driver-option``."""
    options = {"slots": args.slots} | ({"dtype": args.dtype} if args.dtype else {})
    options |= driver_options(args.driver_option)
    return make_model_driver(args.driver, args.model, options)


def build_drivers(args: argparse.Namespace) -> dict[str, Driver]:
    """Every model the kernel serves, by name: the first (the default for processes that
    name none) from the main options, then one per ``--serve``; ValueError on a clash."""
    drivers = {model_name(args): build_driver(args)}
    for spec in getattr(args, "serve", None) or []:
        name = spec["name"]
        if name in drivers:
            raise ValueError(f"two models are named {name!r}: give each --serve a distinct name=")
        options = {k: parse_option_value(v) for k, v in spec.items() if k not in _SERVE_KEYS}
        drivers[name] = make_model_driver(spec["driver"], spec.get("model"), options)
    return drivers


def model_name(args: argparse.Namespace) -> str:
    if args.model_name:
        return args.model_name
    if args.model:
        return re.sub(r"[^A-Za-z0-9_.:@+-]", "-", Path(args.model).name)[:64] or "model"
    return DEFAULT_MODEL_NAME


def daemon_command(options: list[str]) -> list[str]:
    """The command line of a kernel daemon with ``options`` (this module's parser's)."""
    return [sys.executable, "-m", "kernel", *options]


def running_pid(run: Path) -> int | None:
    """Pid of the kernel holding ``run``'s lock (-1 if unreadable), or None if none runs.

    The other half of :func:`acquire_lock`: the lock is held for the kernel's life, so
    a shared lock that cannot be taken means a kernel is alive."""
    try:
        with open(run / "kernel.lock") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = f.read().strip()
                return int(text) if text.isdigit() else -1
            return None
    except FileNotFoundError:
        return None


def acquire_lock(run: Path) -> IO[str]:
    """Hold ``kernel.lock`` for the kernel's life: one kernel per runtime dir."""
    f = open(run / "kernel.lock", "a+")  # noqa: SIM115 - kept open on purpose
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        other = f.read().strip() or "?"
        f.close()
        raise AlreadyRunning(
            f"a kernel (pid {other}) is already running in {run}; `llmos kernel stop` it first"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


#: The kernel log rotates at this size, keeping this many old files (kernel.log.1, ...).
LOG_MAX_BYTES, LOG_BACKUPS = 16 << 20, 3


def make_state_private(state: Path) -> None:
    """Owner-only modes for what the kernel keeps, even in a state dir made before: the
    database and its WAL (every context and file), the log, the file areas. The umask
    makes everything created from now on owner-only too (the sandbox inherits it)."""
    os.umask(0o077)
    state.chmod(0o700)
    # The whole tree: process roots and program areas deep in files/ too. Symlinks are
    # neither followed nor changed (host directories are mounted by path, never linked
    # in here).
    for root, dirs, files in os.walk(state):
        for name in (*dirs, *files):
            entry = Path(root) / name
            with contextlib.suppress(OSError):
                st = entry.lstat()
                loose = stat.S_IMODE(st.st_mode) & 0o077
                if loose and stat.S_ISDIR(st.st_mode):
                    entry.chmod(stat.S_IMODE(st.st_mode) & 0o700 | 0o700)
                elif loose and stat.S_ISREG(st.st_mode):
                    entry.chmod(stat.S_IMODE(st.st_mode) & 0o700)


def setup_logging(state: Path, foreground: bool) -> None:
    handlers: list[logging.Handler] = [
        logging.handlers.RotatingFileHandler(
            state / "kernel.log", maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS
        )
    ]
    if foreground:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(
        level=logging.INFO,
        handlers=handlers,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


#: What ``--listen`` accepts: a ZeroMQ ipc path or a TCP host:port.
_ENDPOINT = re.compile(r"ipc://[^\x00]+|tcp://(\*|[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):\d{1,5}")


def validate_options(args: argparse.Namespace) -> None:
    """ValueError with one sentence naming the first option that cannot work; checked
    before anything starts (``llmos kernel start`` checks before the daemon forks)."""
    from drivers import DRIVERS

    make_policy(args.policy, args.quantum)
    if args.driver not in DRIVERS:
        raise ValueError(f"unknown driver {args.driver!r}; choose from {', '.join(DRIVERS)}")
    if args.max_procs < 128:
        raise ValueError(f"--max-procs {args.max_procs}: at least 128 (64 are the admin's)")
    for flag in ("max_topics", "max_ipc_bytes", "max_parked", "max_calls_in_flight"):
        if getattr(args, flag) < 16:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: at least 16")
    if args.slots < 1:
        raise ValueError(f"--slots {args.slots}: a model needs at least one slot")
    if args.max_loaded is not None and args.max_loaded < 1:
        raise ValueError(f"--max-loaded {args.max_loaded}: at least one model must fit")
    if args.min_awake < 0:
        raise ValueError(f"--min-awake {args.min_awake}: seconds cannot be negative")
    args.mcp_mounts = mcp_mounts(args, os.environ)
    if getattr(args, "metrics", None) is not None:
        metrics_address(args.metrics)
    if getattr(args, "otlp_endpoint", None) is not None:
        if getattr(args, "trace", "on") == "off":
            raise ValueError("--otlp-endpoint exports spans: it needs --trace on")
        check_otlp_endpoint(args.otlp_endpoint)
    for ep in args.listen or []:
        if not _ENDPOINT.fullmatch(ep):
            raise ValueError(
                f"--listen {ep!r}: expected ipc://PATH or tcp://HOST:PORT "
                "(e.g. tcp://127.0.0.1:7077)"
            )
        if getattr(args, "insecure", False) and ep.startswith("tcp://") and not is_loopback(ep):
            raise ValueError(
                f"--listen {ep} --insecure: plain TCP only on a loopback address "
                "(tcp://127.0.0.1:PORT); drop --insecure to serve it with CURVE encryption"
            )


def state_key(args: argparse.Namespace) -> bytes | None:
    """The ``--encrypt-state`` key (None without it); ValueError saying what to do when it
    is missing, malformed, or in a file others can read."""
    if not getattr(args, "encrypt_state", False):
        if getattr(args, "state_key_file", None) is not None:
            raise ValueError("--state-key-file is given without --encrypt-state")
        return None
    file = args.state_key_file
    if file is not None:
        try:
            st = file.stat()
            text = file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"--state-key-file {file}: {exc.strerror}") from None
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise ValueError(
                f"--state-key-file {file} is readable by others (mode "
                f"{oct(stat.S_IMODE(st.st_mode))}): `chmod 600 {file}`"
            )
        where = f"--state-key-file {file}"
    elif env := os.environ.get("LLMOS_STATE_KEY"):
        text, where = env.strip(), "$LLMOS_STATE_KEY"
    else:
        raise ValueError(
            "--encrypt-state needs its key: --state-key-file FILE (0600) or $LLMOS_STATE_KEY, "
            "64 hex characters (make one with `openssl rand -hex 32`)"
        )
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValueError(
            f"{where}: the key must be 64 hex characters (32 bytes; `openssl rand -hex 32`)"
        )
    return bytes.fromhex(text)


def server_curve(args: argparse.Namespace, state: Path, run: Path) -> ServerCurve | None:
    """The CURVE set-up for the tcp:// endpoints (None without any, or with
    ``--insecure``): the state dir's key pair (made on the first start) and, in the
    runtime dir, its public key and a client pair admitted for this run, so the kernel's
    own user needs no set-up."""
    tcp = {ep for ep in args.listen or [] if ep.startswith("tcp://")}
    if not tcp or getattr(args, "insecure", False):
        return None
    pair = curve.server_pair(state)
    local = curve.new_pair()
    curve.write_pair(run / "client.key_secret", local)
    paths.write_private(run / "kernel.server_key", pair.public + "\n")
    log.info("CURVE server key %s (clients pin it: LLMOS_SERVER_KEY)", pair.public)
    return ServerCurve(pair, state, tcp, {local.public})


#: What a kernel leaves in its runtime dir while it runs (removed when it stops).
_RUN_FILES = (
    "kernel.endpoint",
    "kernel.endpoints",
    "admin.token",
    "kernel.server_key",
    "client.key_secret",
    "client.key",
)


async def run_kernel(args: argparse.Namespace, foreground: bool = True) -> int:
    """Start a kernel from parsed options and serve until SIGTERM/SIGINT."""
    run = paths.ensure_private_dir(args.runtime_dir or paths.runtime_dir())
    state = paths.ensure_private_dir(args.state_dir or paths.state_dir())
    make_state_private(state)
    setup_logging(state, foreground)
    try:
        validate_options(args)  # refuse bad options before anything starts
        key = state_key(args)
        drivers = build_drivers(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        lock = acquire_lock(run)
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 1
    endpoints = args.listen or [paths.default_endpoint(run)]
    token = secrets.token_urlsafe(32)
    paths.write_private(run / "admin.token", token + "\n")
    try:  # before the endpoint is published: a client finding it finds the keys too
        secure = server_curve(args, state, run)
    except (OSError, ValueError) as exc:
        log.error("cannot set up CURVE for the tcp:// endpoints: %s", exc)
        lock.close()
        return 1
    paths.write_private(run / "kernel.endpoints", "\n".join(endpoints) + "\n")
    paths.write_private(run / "kernel.endpoint", endpoints[0] + "\n")
    try:
        kernel = Kernel(
            drivers,
            endpoints,
            admin_token=token,
            policy=args.policy,
            quantum=args.quantum,
            state_dir=state,
            max_loaded=args.max_loaded,
            min_awake_s=args.min_awake,
            max_procs=args.max_procs,
            max_topics=args.max_topics,
            max_ipc_bytes=args.max_ipc_bytes,
            max_parked=args.max_parked,
            max_calls_in_flight=args.max_calls_in_flight,
            sandbox=SandboxConfig.detect(unsafe=args.unsafe_python),
            mcp=getattr(args, "mcp_mounts", None) or mcp_mounts(args, os.environ),
            run_journal=not args.no_run_journal,
            trace=args.trace == "on",
            otlp_endpoint=args.otlp_endpoint,
            metrics=metrics_address(args.metrics) if args.metrics is not None else None,
            fs_versions=args.fs_versions,
            fs_history_bytes=args.fs_history_bytes,
            curve=secure,
            state_key=key,
        )
    except StoreError as exc:  # a wrong --encrypt-state key, or a damaged database
        log.error("%s", exc)
        for name in _RUN_FILES:
            (run / name).unlink(missing_ok=True)
        lock.close()
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, kernel.request_stop)
    status = 0
    try:
        try:
            await kernel.start()
        except zmq.ZMQError as exc:  # the endpoint is taken, or its directory is not there
            log.error("cannot listen on %s: %s", ", ".join(endpoints), exc)
            status = 1
        except MetricsError as exc:  # its address is taken or not this host's
            log.error("%s", exc)
            status = 1
        else:
            await kernel.serve_forever()
    finally:
        log.info("kernel shutting down")
        await kernel.stop()
        for name in _RUN_FILES:
            (run / name).unlink(missing_ok=True)
        lock.close()
        log.info("kernel stopped")
    return status


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return asyncio.run(run_kernel(args))
