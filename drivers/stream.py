"""Per-request streams for the drivers whose engine lives on a loop of its own (vllm's
engine loop, openai's I/O loop).

Both drivers keep, for every live request, the same record on their loop: the prompt's
token ids, the output ids so far (resumed ones first), the detokeniser and stop-string
state over the whole output, and a :class:`StreamStatus`. A pump coroutine per request
feeds it the ids the backend generates and ends it exactly once, with a finish reason
or an error. :class:`TokenStream` is that record, :class:`StreamTable` the live
requests of one loop and how they end, and :func:`submit` the front end's side: hand a
stream to the loop, relay its deltas back.

Keeping this in one place is what makes the two drivers cut text, check the context
window, resume after a preemption and end a request the same way.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from drivers.base import (
    Consumer,
    Delta,
    DriverError,
    FinishReason,
    GenerationRequest,
    Outbox,
    relay,
)
from drivers.loopthread import LoopThread
from drivers.text import Detokenizer, StopText

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["StreamStatus", "StreamTable", "TokenStream", "check_room", "submit"]


class StreamStatus(enum.IntEnum):
    """Life of one request's stream (after vLLM v1's ``RequestStatus``): the order
    matters, and every status after ``RUNNING`` is final."""

    #: Made by the front end, not yet registered on its loop.
    WAITING = enum.auto()
    #: Registered; its pump is generating.
    RUNNING = enum.auto()
    #: EOS, a stop string, or the backend's own stop.
    FINISHED_STOPPED = enum.auto()
    #: ``max_tokens`` or the context window.
    FINISHED_LENGTH = enum.auto()
    #: :meth:`StreamTable.abort`, or the loop shutting down.
    FINISHED_ABORTED = enum.auto()
    #: Ended with a :class:`DriverError` (no finish reason is sent).
    FAILED = enum.auto()

    def is_finished(self) -> bool:
        """True once the stream has ended (its last item was sent)."""
        return self > StreamStatus.RUNNING

    @property
    def finish_reason(self) -> FinishReason | None:
        """The reason the stream's last delta reports; None while running or if failed."""
        return _REASONS.get(self)

    @classmethod
    def finished(cls, reason: FinishReason) -> StreamStatus:
        """The final status a generation ending for ``reason`` takes."""
        return _STATUSES[reason]


_REASONS: dict[StreamStatus, FinishReason] = {
    StreamStatus.FINISHED_STOPPED: "stop",
    StreamStatus.FINISHED_LENGTH: "length",
    StreamStatus.FINISHED_ABORTED: "abort",
}
# One finished status per finish reason (tests/test_driver_stream.py checks it covers
# FinishReason, and that the drivers' FinishReason is the syscall contract's).
_STATUSES: dict[FinishReason, StreamStatus] = {r: s for s, r in _REASONS.items()}


def check_room(prompt_tokens: int, resumed_tokens: int, max_context: int) -> None:
    """Raise :class:`DriverError` unless a prompt of ``prompt_tokens`` (not empty), plus
    ``resumed_tokens`` already generated, leaves room to generate in ``max_context``
    (0: unknown, only emptiness is checked). Every driver that tokenizes says it alike."""
    if not prompt_tokens:
        raise DriverError("The prompt is empty; send at least one token of text.")
    if max_context and prompt_tokens >= max_context:
        raise DriverError(
            f"The prompt is {prompt_tokens} tokens but the model's context "
            f"window is {max_context}; shorten the prompt."
        )
    if resumed_tokens and max_context and prompt_tokens + resumed_tokens >= max_context:
        raise DriverError("The prompt plus the tokens already generated fill the context window.")


@dataclass(eq=False)
class TokenStream:
    """One request on its driver's loop. After submission only that loop touches it.

    ``output_ids`` includes the request's ``resume_ids`` (after :meth:`replay`), so
    counts, the budget and stop strings run across a preemption as if none happened.
    """

    request: GenerationRequest
    sink: Consumer
    prompt_ids: list[int]
    detok: Detokenizer
    stop_text: StopText
    output_ids: list[int] = field(default_factory=list)
    #: Ids not yet sent in a delta (sent with the next text or the finish).
    unsent_ids: list[int] = field(default_factory=list)
    #: Of the prompt and resumed tokens, how many the backend's prefix cache held.
    cached_tokens: int = 0
    status: StreamStatus = StreamStatus.WAITING
    #: The pump generating it (set by :meth:`StreamTable.start`).
    task: asyncio.Task[None] | None = None

    @classmethod
    def open(
        cls, request: GenerationRequest, prompt_ids: list[int], tokenizer: PreTrainedTokenizerBase
    ) -> Self:
        """A stream for ``request`` whose deltas go to a new queue read on the running
        loop: call it on the front end's (the consumer's) loop."""
        queue: asyncio.Queue[Delta | DriverError] = asyncio.Queue()
        return cls(
            request,
            Consumer(asyncio.get_running_loop(), queue),
            prompt_ids,
            Detokenizer(tokenizer),
            StopText(request.sampling.stop),
        )

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def replay(self, max_context: int) -> None:
        """Check the prompt fits ``max_context`` (0: unknown, not checked) and put the
        detokeniser and stop-string state where an uninterrupted run would have them
        after ``resume_ids`` (their text was already delivered, so none is released).

        Raises :class:`DriverError` for an empty prompt or one that leaves no room.
        """
        resume = self.request.resume_ids
        check_room(len(self.prompt_ids), len(resume), max_context)
        for token in resume:
            self.stop_text.push(self.detok.push(token))
        self.output_ids = list(resume)

    def accept(self, ids: Iterable[int]) -> tuple[str, bool]:
        """Record generated ids; return their releasable text and whether a stop string
        ended the output (ids after the one completing it are dropped)."""
        released: list[str] = []
        for token in ids:
            self.output_ids.append(token)
            self.unsent_ids.append(token)
            text, stopped = self.stop_text.push(self.detok.push(token))
            released.append(text)
            if stopped:
                return "".join(released), True
        return "".join(released), False

    def accept_text(self, text: str, ids: list[int]) -> tuple[str, bool]:
        """Record output that came as text, with ``ids`` its tokens by our tokenizer (a
        backend that sends no ids); return what :meth:`accept` returns."""
        self.output_ids.extend(ids)
        self.unsent_ids.extend(ids)
        return self.stop_text.push(text)

    def delta(self, text: str, finish: FinishReason | None = None) -> Delta:
        """A delta carrying ``text`` and every id not sent yet."""
        ids, self.unsent_ids = self.unsent_ids, []
        return Delta(
            text, ids, len(self.prompt_ids), len(self.output_ids), finish, self.cached_tokens
        )


S = TypeVar("S", bound=TokenStream)


class StreamTable(Generic[S]):
    """The live streams of one loop by request id, and how each ends: exactly once,
    with a finish reason (:meth:`finish`) or an error (:meth:`fail`). Its methods run on
    that loop only.

    ``describe(stream, exc)`` turns an unexpected exception from a stream's pump into
    the error its consumer raises (a :class:`DriverError` is passed on as it is).
    """

    def __init__(self, describe: Callable[[S, Exception], DriverError]) -> None:
        self.live: dict[str, S] = {}
        self._describe = describe
        self._outbox: Outbox | None = None  # made on the loop, at the first send

    def start(self, stream: S, pump: Callable[[S], Coroutine[Any, Any, None]]) -> None:
        """Register ``stream`` and run ``pump(stream)`` for it; an id already live fails
        the new stream (the live one goes on)."""
        rid = stream.request_id
        if rid in self.live:
            stream.status = StreamStatus.FAILED
            self.send(stream, DriverError(f"Request id {rid!r} is already generating."))
            return
        self.live[rid] = stream
        stream.status = StreamStatus.RUNNING
        stream.task = asyncio.get_running_loop().create_task(self._run(stream, pump))

    async def _run(self, stream: S, pump: Callable[[S], Coroutine[Any, Any, None]]) -> None:
        try:
            await pump(stream)
        except asyncio.CancelledError:
            # An abort already ended it; otherwise the loop is shutting down.
            self.finish(stream, "abort")
        except DriverError as exc:
            self.fail(stream, exc)
        except Exception as exc:  # noqa: BLE001 - any failure ends this request only
            self.fail(stream, self._describe(stream, exc))
        finally:
            self.forget(stream)

    def abort(self, request_id: str) -> None:
        """End ``request_id`` now with ``abort`` and cancel its pump, which drops the
        backend's request. Unknown or finished ids are ignored."""
        stream = self.live.get(request_id)
        if stream is None or stream.status.is_finished():
            return
        # Held-back stop-string text is not released: a resumed request re-derives it.
        self.finish(stream, "abort")
        if stream.task is not None:
            stream.task.cancel()

    def finish(self, stream: S, reason: FinishReason, text: str = "") -> None:
        """End ``stream`` with a last delta: ``text``, the unsent ids and ``reason``."""
        if stream.status.is_finished():
            return
        stream.status = StreamStatus.finished(reason)
        self.forget(stream)  # before the send: the consumer may reuse the id at once
        self.send(stream, stream.delta(text, reason))

    def fail(self, stream: S, error: DriverError) -> None:
        """End ``stream`` with ``error``, which its consumer raises."""
        if stream.status.is_finished():
            return
        stream.status = StreamStatus.FAILED
        self.forget(stream)
        self.send(stream, error)

    def forget(self, stream: S) -> None:
        """Drop ``stream`` from the live ones (not a stream reusing its id since)."""
        if self.live.get(stream.request_id) is stream:
            del self.live[stream.request_id]

    def send(self, stream: S, item: Delta | DriverError) -> None:
        """Queue ``item`` for ``stream``'s consumer."""
        # One hand-over per consumer loop for all the deltas of an engine step (the
        # first delta schedules the flush after the step's other outputs).
        if self._outbox is None:
            self._outbox = Outbox(flush_on=asyncio.get_running_loop())
        self._outbox.put(stream.sink, item)

    async def close(self) -> None:
        """End every live stream with ``abort`` and wait for their pumps to exit."""
        streams = list(self.live.values())
        for stream in streams:
            self.abort(stream.request_id)
        tasks = [s.task for s in streams if s.task is not None]
        if tasks:  # let each cancelled pump close its backend request
            await asyncio.gather(*tasks, return_exceptions=True)


def submit(
    loop: LoopThread,
    stream: S,
    start: Callable[[S], None],
    abort: Callable[[str], None],
    on_error: Callable[[DriverError], None] | None = None,
) -> AsyncIterator[Delta]:
    """Hand ``stream`` to ``start`` on ``loop`` and return its deltas as :func:`relay`
    gives them (``abort(request_id)`` runs on ``loop`` if the consumer leaves early).
    Wrap the result in ``contextlib.aclosing``, as for :func:`relay`."""
    rid = stream.request_id
    queue = stream.sink.queue
    loop.call(lambda: start(stream))
    return relay(queue, lambda: loop.call(lambda: abort(rid)), on_error)
