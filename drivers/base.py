"""The driver interface: how the kernel talks to a model backend.

A driver owns one model. It exposes a fixed number of *slots* (sequences it decodes
at once); the kernel's scheduler never has more than ``slots`` generations in flight
on a driver. All model work (tokenising, prefill, decoding) runs off the kernel's
asyncio loop: a driver hands token deltas back to the loop as an async stream.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Literal

#: Why a generation ended. ``stop``: EOS token or a stop string; ``length``: max_tokens
#: or the model's context window; ``abort``: :meth:`Driver.abort` was called. The same
#: Literal as ``syscalls.models.FinishReason`` (kept here so drivers import no syscall
#: models; tests/test_driver_stream.py checks the two match).
FinishReason = Literal["stop", "length", "abort"]

#: Where a driver is in its life (``ModelInfo.state``).
DriverState = Literal["unloaded", "loading", "ready", "failed"]

#: A chat message as the kernel keeps it in a process's context.
Message = dict[str, str]

#: Progress callback for long work (model export/load): ``(description, fraction or None)``.
Progress = Callable[[str, float | None], None]


class DriverError(Exception):
    """A driver failed in a way the kernel reports to the caller as ``EIO``."""


class FormatError(DriverError):
    """A response format (schema, regex, grammar) is invalid or cannot be compiled: the
    caller's mistake, reported as ``EINVAL`` with the sentence saying what is wrong."""


class UnsupportedError(DriverError):
    """The driver cannot do what the request asks (e.g. constrain its output): ``ENOTSUP``."""


#: Kinds of structured output: a JSON Schema, any JSON object, one of fixed strings, a
#: regular expression, or an EBNF grammar (xgrammar's dialect, with a ``root`` rule).
FormatType = Literal["json_schema", "json_object", "choice", "regex", "grammar"]


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A formal language the output must belong to (structured output).

    ``spec`` is the language's source: the JSON Schema as JSON text (``json_schema``),
    the regular expression (``regex``) or the EBNF grammar (``grammar``); empty for
    ``json_object`` and ``choice``, whose ``choices`` lists the allowed outputs. Hashable:
    drivers cache compiled grammars by it.
    """

    type: FormatType
    spec: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """How to pick tokens. ``temperature == 0`` means greedy (deterministic)."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Constrain the output to this language (None: free text).
    response_format: ResponseFormat | None = None


@dataclass(slots=True)
class GenerationRequest:
    """One generation. ``prompt`` is a chat (list of messages, the driver applies the
    model's chat template with a generation prompt) or raw text (no template)."""

    request_id: str
    prompt: list[Message] | str
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    priority: int = 0
    #: Output tokens this request already produced before it was preempted (STOP, or
    #: the scheduler's quantum). The driver appends them to the prompt's tokens and
    #: continues after them: ``max_tokens`` counts them too, they are never re-emitted,
    #: stop strings and EOS are checked across the boundary, and the reported
    #: ``output_tokens`` includes them, so a resumed greedy generation ends with exactly
    #: the text and token count of an uninterrupted one.
    resume_ids: list[int] = field(default_factory=list)
    #: A LoRA adapter (one of the driver's :meth:`Driver.adapters`) to generate with.
    adapter: str | None = None
    #: Stable key of the LLM process across its turns and resumes (``llmos-<kernel
    #: instance>-<pid>``): a router with session affinity keeps its KV on one replica.
    session: str | None = None
    #: Stable key of the process's program (``llmos-<kernel instance>-prog<pgid>``):
    #: the tenant a fair router queues by.
    program: str | None = None
    #: Output tokens this stretch is expected to make (the process's mean, at most
    #: what ``max_tokens`` leaves); None: unknown.
    expected_tokens: int | None = None


@dataclass(slots=True)
class Delta:
    """A piece of a generation's output.

    ``text``/``token_ids`` are the new output since the previous delta. The last delta of
    a stream has ``finish_reason`` set; ``prompt_tokens``/``output_tokens`` are running
    totals for the request.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    output_tokens: int
    finish_reason: FinishReason | None = None
    #: Of the prompt and resumed tokens, how many came from the driver's prefix cache
    #: (not computed again): the saving on a resume or a conversation's next turn.
    cached_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a driver reports about itself (``sys.info``, ``llmos models``)."""

    driver: str
    model: str
    max_context: int
    slots: int
    state: DriverState
    detail: str = ""
    #: Bytes the model occupies (weights, plus caches where cheaply known); None: unknown.
    memory_bytes: int | None = None


class Driver(abc.ABC):
    """A model backend. Subclasses: ``drivers.cpu.CpuDriver`` (transformers)."""

    #: Short driver name used on the command line (``--driver``).
    name: str = "abstract"

    @property
    @abc.abstractmethod
    def slots(self) -> int:
        """How many sequences this driver decodes at once."""

    @abc.abstractmethod
    async def load(self, progress: Progress | None = None) -> None:
        """Load the model (off the event loop). Raise :class:`DriverError` on failure."""

    @abc.abstractmethod
    def info(self) -> ModelInfo:
        """Describe the driver and its model; cheap, callable from the event loop."""

    @abc.abstractmethod
    async def count_tokens(self, prompt: list[Message] | str) -> int:
        """Tokens ``prompt`` occupies (chat template and generation prompt included)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Stream deltas for ``request``; the last one has ``finish_reason`` set.

        Raises :class:`DriverError` (or yields nothing more) if the model fails.
        """

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Stop ``request_id`` within one decoding step; its stream then ends with
        ``finish_reason == "abort"``. Unknown or finished ids are ignored."""

    def adapters(self) -> list[str]:
        """Names of the LoRA adapters a process may pick at spawn (none by default)."""
        return []

    @property
    def resumes_formats(self) -> bool:
        """Whether a constrained generation resumes exactly after a preemption (its
        grammar continues after ``resume_ids``); the kernel never preempts one otherwise."""
        return True

    async def prepare_format(self, response_format: ResponseFormat) -> None:
        """Check ``response_format`` (and compile it, where the driver caches compiled
        grammars) before a generation uses it, off the event loop.

        Raises :class:`FormatError` if it is invalid and :class:`UnsupportedError` if
        this driver cannot constrain its output (the default).
        """
        raise UnsupportedError(
            f"the {self.name} driver cannot constrain its output (response_format); "
            f"use the cpu or vllm driver"
        )

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release the model and worker threads."""

    async def sleep(self) -> None:
        """Free the model's memory for another model (the kernel calls this only when no
        request is live). Default: unload, as :meth:`shutdown`; :meth:`wake` loads again."""
        await self.shutdown()

    async def wake(self, progress: Progress | None = None) -> None:
        """Bring a sleeping model back (default: :meth:`load` again, from the exported
        cache). Raises :class:`DriverError` as :meth:`load` does."""
        await self.load(progress)


async def relay(
    queue: asyncio.Queue[Delta | DriverError],
    abort: Callable[[], None],
    on_error: Callable[[DriverError], None] | None = None,
) -> AsyncIterator[Delta]:
    """A request's deltas as its engine puts them on ``queue``, up to the one with a
    finish reason; a :class:`DriverError` put there is raised (after ``on_error``).
    If the consumer stops early (closed, cancelled), ``abort()`` drops the request.
    Drivers wrap it in ``contextlib.aclosing`` so the abort runs when they are closed."""
    done = False
    try:
        while not done:
            item = await queue.get()
            if isinstance(item, DriverError):
                done = True
                if on_error is not None:
                    on_error(item)
                raise item
            done = item.finish_reason is not None
            yield item
    finally:
        if not done:
            abort()


@dataclass(frozen=True, slots=True)
class Consumer:
    """Where one request's deltas go: an asyncio queue read on ``loop`` (by :func:`relay`)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Delta | DriverError]


def _deliver(batch: list[tuple[asyncio.Queue[Delta | DriverError], Delta | DriverError]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


class Outbox:
    """Deltas a producer (an engine thread, or an engine's own event loop) makes for
    consumers on other event loops, handed over in batches.

    Handing each delta over with its own ``call_soon_threadsafe`` wakes the consumer's
    loop once per token per sequence (a write to its self-pipe, a wake-up, a fight for
    the GIL with the engine that is still emitting the step's other tokens); at 16
    sequences that is 16 wake-ups per decoding step. The outbox keeps a step's deltas and
    :meth:`flush` hands them over with one call per consumer loop, in order.

    With ``flush_on``, a producer running on that loop flushes by itself: the first
    :meth:`put` after a flush schedules one on the producer's loop, after the callbacks
    already ready (the other requests' outputs of the same engine step). Otherwise the
    producer calls :meth:`flush` itself, e.g. at the end of each step.
    """

    def __init__(self, flush_on: asyncio.AbstractEventLoop | None = None) -> None:
        self._items: list[tuple[Consumer, Delta | DriverError]] = []
        self._flush_on = flush_on

    def put(self, consumer: Consumer, item: Delta | DriverError) -> None:
        """Queue ``item`` for ``consumer`` (producer's thread only)."""
        if not self._items and self._flush_on is not None:
            self._flush_on.call_soon(self.flush)
        self._items.append((consumer, item))

    def flush(self) -> list[Consumer]:
        """Hand every queued item over; returns the consumers whose loop is closed (their
        items are dropped: nobody is left to read them)."""
        if not self._items:
            return []
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Consumer, Delta | DriverError]]] = {}
        for consumer, item in items:
            by_loop.setdefault(consumer.loop, []).append((consumer, item))
        dead: list[Consumer] = []
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(c.queue, item) for c, item in batch])
            except RuntimeError:  # the consumer's loop is closed
                dead.extend(c for c, _ in batch)
        return dead
