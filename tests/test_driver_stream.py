"""drivers/stream.py: the per-request stream the vllm and openai drivers share (status,
replay of resumed tokens, accept, finish/fail exactly once, the live table), and the
one definition of finish reasons. No model: a tiny fake tokenizer stands in."""

from __future__ import annotations

import asyncio
from typing import Any, get_args

import pytest

import syscalls.models
from drivers import base
from drivers.base import Delta, DriverError, GenerationRequest, SamplingOptions
from drivers.stream import StreamStatus, StreamTable, TokenStream, check_room


class _WordTokenizer:
    """Token id ``i`` decodes to ``" w{i}"``; enough for Detokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids)


def _stream(resume: list[int] | None = None, stop: tuple[str, ...] = ()) -> TokenStream:
    request = GenerationRequest(
        "r1", "prompt", SamplingOptions(stop=stop), resume_ids=list(resume or [])
    )
    return TokenStream.open(request, [1, 2, 3], _WordTokenizer())  # type: ignore[arg-type]


def test_finish_reasons_have_one_definition() -> None:
    # The drivers' finish reasons are the syscall contract's, and each has a final status.
    assert get_args(base.FinishReason) == get_args(syscalls.models.FinishReason)
    finished = {s.finish_reason for s in StreamStatus if s.finish_reason is not None}
    assert finished == set(get_args(base.FinishReason))
    for reason in get_args(base.FinishReason):
        status = StreamStatus.finished(reason)
        assert status.is_finished() and status.finish_reason == reason


def test_status_order_derives_is_finished() -> None:
    assert not StreamStatus.WAITING.is_finished()
    assert not StreamStatus.RUNNING.is_finished()
    assert StreamStatus.FAILED.is_finished() and StreamStatus.FAILED.finish_reason is None


def test_check_room() -> None:
    with pytest.raises(DriverError, match="empty"):
        check_room(0, 0, 10)
    with pytest.raises(DriverError, match="context"):
        check_room(10, 0, 10)
    with pytest.raises(DriverError, match="already generated"):
        check_room(5, 5, 10)
    check_room(5, 4, 10)
    check_room(50, 50, 0)  # unknown window: only emptiness is checked


def test_replay_counts_resumed_tokens_without_releasing_their_text() -> None:
    async def go() -> tuple[TokenStream, tuple[str, bool]]:
        stream = _stream(resume=[7, 8])
        stream.replay(max_context=100)
        return stream, stream.accept([9])

    stream, (text, stopped) = asyncio.run(go())
    assert stream.output_ids == [7, 8, 9] and not stopped
    assert text == " w9"  # w7 w8 were delivered before the preemption
    delta = stream.delta(text)
    assert (delta.token_ids, delta.prompt_tokens, delta.output_tokens) == ([9], 3, 3)


def test_accept_stops_across_the_resume_boundary() -> None:
    async def go() -> tuple[TokenStream, tuple[str, bool]]:
        stream = _stream(resume=[7], stop=("w7 w8",))
        stream.replay(max_context=100)
        return stream, stream.accept([8, 9])

    stream, (text, stopped) = asyncio.run(go())
    assert stopped and stream.output_ids == [7, 8]  # the id after the stop is dropped


def test_table_ends_a_stream_once() -> None:
    async def go() -> list[Any]:
        table: StreamTable[TokenStream] = StreamTable(lambda s, e: DriverError(str(e)))
        stream = _stream()
        started = asyncio.Event()

        async def pump(s: TokenStream) -> None:
            s.replay(100)
            started.set()
            await asyncio.sleep(3600)

        table.start(stream, pump)
        assert stream.status is StreamStatus.RUNNING and "r1" in table.live
        await started.wait()
        table.abort("r1")
        table.finish(stream, "stop")  # ignored: already finished
        table.fail(stream, DriverError("late"))  # ignored too
        assert stream.task is not None
        await asyncio.gather(stream.task, return_exceptions=True)
        assert stream.status is StreamStatus.FINISHED_ABORTED and not table.live
        items = []
        queue = stream.sink.queue
        await asyncio.sleep(0)  # the outbox flush
        while not queue.empty():
            items.append(queue.get_nowait())
        return items

    items = asyncio.run(go())
    assert len(items) == 1 and isinstance(items[0], Delta) and items[0].finish_reason == "abort"


def test_table_fails_a_pump_error_and_a_duplicate_id() -> None:
    async def go() -> tuple[list[Any], list[Any]]:
        table: StreamTable[TokenStream] = StreamTable(
            lambda s, e: DriverError(f"described {type(e).__name__}")
        )
        first, second = _stream(), _stream()

        async def pump(s: TokenStream) -> None:
            await asyncio.sleep(0)
            raise ValueError("boom")

        table.start(first, pump)
        table.start(second, pump)  # same id while the first is live
        assert first.task is not None
        await asyncio.gather(first.task, return_exceptions=True)
        await asyncio.sleep(0)
        return [first.sink.queue.get_nowait()], [second.sink.queue.get_nowait()]

    (a,), (b,) = asyncio.run(go())
    assert isinstance(a, DriverError) and str(a) == "described ValueError"
    assert isinstance(b, DriverError) and "already generating" in str(b)
