"""The kernel's ZeroMQ front door: replies queued in one loop iteration leave together."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq

from kernel.transport import Transport


def _dealer(ctx: zmq.Context, endpoint: str, identity: bytes) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    return sock


async def _until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def test_replies_to_one_peer_in_one_iteration_go_out_as_one_multipart_message(
    tmp_path: Path,
) -> None:
    endpoint = f"ipc://{tmp_path}/k.sock"
    received: list[list[bytes]] = []
    ctx = zmq.Context()
    a, b = _dealer(ctx, endpoint, b"peer-a"), _dealer(ctx, endpoint, b"peer-b")

    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        transport = Transport([endpoint], received.append)
        transport.bind()
        transport.start()
        try:
            a.send(b"hello")
            b.send(b"hello")
            await _until(lambda: len(received) == 2)
            # Three replies for a and one for b, queued in the same iteration.
            for frame in (b"1", b"2", b"3"):
                transport.send(b"peer-a", frame)
            transport.send(b"peer-b", b"x")
            # The loop's next iteration flushes them, while the reads below wait (5 s at most).
            first_a = await asyncio.to_thread(a.recv_multipart)
            first_b = await asyncio.to_thread(b.recv_multipart)
            # A later iteration's reply is a message of its own.
            transport.send(b"peer-a", b"4")
            return first_a, first_b, await asyncio.to_thread(a.recv_multipart)
        finally:
            await transport.close()

    try:
        first_a, first_b, later_a = asyncio.run(main())
    finally:
        a.close()
        b.close()
        ctx.term()
    assert sorted(received) == [[b"peer-a", b"hello"], [b"peer-b", b"hello"]]
    assert first_a == [b"1", b"2", b"3"]
    assert first_b == [b"x"]
    assert later_a == [b"4"]


def test_a_reply_queued_just_before_close_is_still_sent(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/k.sock"
    received: list[list[bytes]] = []
    ctx = zmq.Context()
    a = _dealer(ctx, endpoint, b"peer-a")

    async def main() -> None:
        transport = Transport([endpoint], received.append)
        transport.bind()
        transport.start()
        a.send(b"hello")
        await _until(lambda: bool(received))
        transport.send(b"peer-a", b"bye")
        await transport.close()  # flushes before the socket goes

    try:
        asyncio.run(main())
        got = a.recv_multipart()
    finally:
        a.close()
        ctx.term()
    assert got == [b"bye"]


def test_the_sdks_deadline_bounds_waiting_for_frames_not_a_slow_consumer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer that takes longer over the yielded frames than the call's whole budget
    still gets every frame; a kernel that sends nothing is ETIMEDOUT, not a hang."""
    from llmos import transport as sdk
    from syscalls import codec
    from syscalls.errors import Errno, SyscallError

    monkeypatch.setattr(sdk, "GRACE_S", 0.05)
    endpoint = f"ipc://{tmp_path}/k.sock"

    async def main() -> tuple[list[object], SyscallError]:
        kernel: Transport

        def answer(parts: list[bytes]) -> None:
            req = codec.decode_request(parts[1])
            if req.call == "sys.info":  # answered at once: two chunks, then the result
                kernel.send(parts[0], codec.chunk_frame(req.id, 0, {"text": "a"}))
                kernel.send(parts[0], codec.chunk_frame(req.id, 1, {"text": "b"}))
                kernel.send(parts[0], codec.ok_reply(req.id, {"done": True}, 2))
            # anything else is never answered

        kernel = Transport([endpoint], answer)
        kernel.bind()
        kernel.start()
        client = sdk.AsyncTransport(endpoint)
        try:
            got: list[object] = []
            async for frame in client.frames("sys.info", {}, 0, "t", deadline_ms=100):
                got.append(frame)
                await asyncio.sleep(0.3)  # longer than the whole budget (0.15 s)
            with pytest.raises(SyscallError) as silent:
                async for _ in client.frames("proc.ps", {}, 0, "t", deadline_ms=100):
                    pass
            return got, silent.value
        finally:
            await client.close()
            await kernel.close()

    got, silent = asyncio.run(main())
    assert got == [{"text": "a"}, {"text": "b"}, {"done": True}]
    assert silent.code is Errno.ETIMEDOUT
