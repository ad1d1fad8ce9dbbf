"""The fuzz corpus: hostile values for every field of every syscall in the table, sent
over a raw ZeroMQ socket to a real daemon (sim driver). No reply may be ``EIO``
"internal kernel error" (an unhandled exception in the kernel), the kernel stays up and
another client keeps being answered.

The corpus is generated from ``syscalls.table.SYSCALLS`` with a seeded generator, so a
new syscall or field is fuzzed without touching this file, and a failure replays.
"""

from __future__ import annotations

import random
import time
import types
import typing
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from pydantic import BaseModel

from syscalls import codec
from syscalls.errors import ETIMEDOUT
from syscalls.table import SYSCALLS
from tests.kernels import Daemon
from tests.test_stalls import Pinger

SEED = 21
#: Replies the fuzzer waits for at once (it sends more as they come back).
WINDOW = 64
#: Every request's deadline: calls that wait (ipc.recv, tool.next, llm.generate) end soon.
DEADLINE_MS = 300


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def hostile_values(rng: random.Random) -> list[Any]:
    """Values no field expects, and some that it does, at its edges."""
    return [
        None,
        True,
        0,
        -1,
        -(2**63),
        2**63 - 1,
        2**64 - 1,
        float("nan"),
        float("inf"),
        -1e308,
        "",
        " ",
        "x" * 200_001,
        "\x00",
        "../../etc/passwd",
        "/mnt/../../etc",
        "é" * 1000,
        "\u202e\ufeff😀" * 50,
        "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(64)),
        b"\xff\xfe",
        [],
        [None] * 3,
        list(range(5000)),
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": "hi", "extra": 1}],
        {},
        {"a": 1},
        {"": None, "x" * 300: [1]},
        _deep(60),
        _deep(200),
        {"type": 5},
        {"type": "object", "properties": {"a": {"$ref": "http://127.0.0.1:9/x"}}},
    ]


def sample(annotation: Any) -> Any:
    """A plausible value of ``annotation`` (the base a hostile value replaces one field of)."""
    origin, params = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return sample(params[0])
    if origin is typing.Literal:
        return params[0]
    if origin in (typing.Union, types.UnionType):
        return sample(next((p for p in params if p is not type(None)), None))
    if origin is list:
        return [sample(params[0])] if params else []
    if origin is dict:
        return {}
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return base_args(annotation)
        for kind, value in ((bool, False), (int, 1), (float, 1.0), (str, "a")):
            if issubclass(annotation, kind):
                return value
    return None


def base_args(model: type[BaseModel]) -> dict[str, Any]:
    """Every required field of ``model`` with a plausible value."""
    return {
        name: sample(info.annotation)
        for name, info in model.model_fields.items()
        if info.is_required()
    }


def corpus(pid: int, token: str) -> Iterator[tuple[str, dict[str, Any] | Any]]:
    """(syscall, args) pairs: each field alone with each hostile value, each field with
    the others missing, unknown fields, and args that are not a map at all."""
    rng = random.Random(SEED)
    values = hostile_values(rng)
    for name, spec in sorted(SYSCALLS.items()):
        if name == "proc.exit":
            continue  # it would end the fuzzing process; exercised last
        fields = list(spec.args.model_fields)
        yield name, {}
        yield name, {"no_such_field": 1}
        yield name, "not a map"
        yield name, [1, 2]
        base = base_args(spec.args)
        yield name, base
        for field in fields:
            for value in values:
                yield name, {**base, field: value}
            others = {f: rng.choice(values) for f in fields}
            yield name, others
    for value in values[:20]:
        yield "proc.exit", {"status": value}


def _frames(pid: int, token: str) -> Iterator[bytes]:
    rid = 0
    for name, args in corpus(pid, token):
        rid += 1
        yield msgpack.packb(
            {
                "v": 1,
                "id": rid,
                "call": name,
                "pid": pid,
                "token": token,
                "deadline_ms": DEADLINE_MS,
                "args": args,
            },
            use_bin_type=True,
        )
    for token_value in ("tökén", "\x00", "x" * 5000, 5, None, b"\xff"):  # envelope fuzz
        for pid_value in (0, pid, -1, 2**64 - 1, "1", None):
            rid += 1
            yield msgpack.packb(
                {
                    "v": 1,
                    "id": rid,
                    "call": "proc.getpid",
                    "pid": pid_value,
                    "token": token_value,
                    "args": {},
                },
                use_bin_type=True,
            )


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    k = Daemon(tmp_path_factory.mktemp("fuzz"), "--driver", "sim", "--slots", "2").start()
    yield k
    k.stop(timeout=120)


def test_fuzz_every_syscall_field_gets_no_internal_error(daemon: Daemon) -> None:
    with daemon.admin() as admin:
        victim, other = admin.spawn("fuzzed"), admin.spawn("bystander")
        t_load = time.monotonic()  # load the embedding model first: fs.write embeds text,
        while True:  # and its load (CPU-bound, slow on a busy machine) is not what is fuzzed
            try:
                victim.files.write("primed.txt", "the embedder is loaded")
                break
            except ETIMEDOUT:
                assert time.monotonic() - t_load < 300
        print(f"\nembedder loaded in {time.monotonic() - t_load:.1f} s")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(daemon.endpoint)
        sent = answered = 0
        internal: list[tuple[str, str]] = []
        names: dict[int, str] = {}
        codes: dict[str, int] = {}
        started: dict[int, float] = {}
        slowest: list[tuple[float, str]] = []
        t0 = time.monotonic()
        try:
            with Pinger(other) as pinger:
                frames = _frames(victim.pid, victim.token)
                exhausted = False
                while not exhausted or answered < sent:
                    while not exhausted and sent - answered < WINDOW:
                        frame = next(frames, None)
                        if frame is None:
                            exhausted = True
                            break
                        rid = msgpack.unpackb(frame, raw=False)["id"]
                        names[rid] = msgpack.unpackb(frame, raw=False)["call"]
                        started[rid] = time.monotonic()
                        sock.send(frame)
                        sent += 1
                    if not sock.poll(30_000):
                        pytest.fail(f"no reply for 30 s after {answered} of {sent} frames")
                    reply = codec.unpackb(sock.recv())
                    if "chunk" in reply:
                        continue
                    answered += 1
                    rid = reply.get("id")
                    if rid in started:
                        slowest.append((time.monotonic() - started.pop(rid), names[rid]))
                    error = reply.get("error") or {}
                    code = error.get("code", "ok")
                    codes[code] = codes.get(code, 0) + 1
                    if code == "EIO" and "internal" in error.get("message", ""):
                        internal.append((names.get(reply.get("id"), "?"), error["message"]))
            elapsed = time.monotonic() - t0
            figures = pinger.report(f"{sent} fuzz frames in {elapsed:.1f} s, replies {codes}")
            slowest.sort(reverse=True)
            print("slowest round trips:", [(f"{t * 1000:.0f} ms", n) for t, n in slowest[:8]])
            assert figures["n"] > 0
        finally:
            sock.close()
            ctx.term()
        assert not internal, internal[:10]
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert other.getpid().pid == other.pid
        for row in admin.ps():
            if row.pid != other.pid and row.pid > 1:
                admin.kill(row.pid, "KILL")
