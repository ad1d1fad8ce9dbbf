"""A SIMULATED driver: no model, a fixed token rate, deterministic output.

For scheduler studies and benchmarks at scale (hundreds of processes, no CPU spent on a
model) and for fast checks of kernel mechanism. It is never a stand-in where the real
model can run: integration tests use ``drivers.cpu``.

Its "tokens" are words: token id ``i`` is the word ``w{i}``; a prompt's tokens are its
whitespace-separated words (plus one per chat message). The output for a prompt is
``w{h}, w{h+1}, ...`` where ``h`` is a hash of the prompt, so greedy output is a pure
function of the prompt, as with a real model. It never emits EOS on its own: a
generation ends at ``max_tokens``, after ``eos_after`` tokens if set, or where the
prompt asks: the last message (or raw prompt) containing ``<sim:reply=N>`` makes it stop
("stop", as at EOS) after ``N`` tokens, so a benchmark can give every answer its own
length without revealing it to the scheduler through ``max_tokens``. Having no tokenizer,
it cannot constrain its output: a ``response_format`` is refused (``UnsupportedError``).

Timing model, per slot (slots do not slow each other down):

* prefill: before its first token a request waits ``(prompt tokens + len(resume_ids)) /
  prefill_tokens_per_s``, so resuming a preempted generation costs a real re-prefill of
  everything it had, the context switch a real model pays without a prefix cache;
* decoding: one token every ``1 / tokens_per_s`` seconds, each step stretched by up to
  ``jitter`` (a fraction) drawn from an RNG seeded by ``seed`` and the request, so a run
  is reproducible;
* abort: a request stops within one decoding step, or at once while prefilling;
* prefix cache (off unless ``prefix_cache_tokens`` > 0): an aborted (preempted or
  stopped) sequence's "KV" is kept, within that many tokens in all, oldest dropped
  first, and resuming it prefills one token instead of everything (``cached_tokens`` in
  its deltas), the way the CPU driver's prefix cache makes a context switch cheap;
* loading: ``load`` (and so a wake after the kernel put the model to sleep) takes
  ``load_s`` seconds; ``shutdown`` (a sleep) drops the prefix cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
from collections import OrderedDict
from collections.abc import AsyncIterator

from drivers.base import (
    Delta,
    Driver,
    DriverError,
    DriverState,
    FinishReason,
    GenerationRequest,
    Message,
    ModelInfo,
    Progress,
)

#: ``<sim:reply=N>`` in a prompt's last message: the simulated answer is N tokens long.
REPLY_HINT = re.compile(r"<sim:reply=(\d+)>")


def reply_hint(prompt: list[Message] | str) -> int | None:
    """The answer length a prompt asks the simulator for, if any."""
    text = prompt if isinstance(prompt, str) else (prompt[-1]["content"] if prompt else "")
    found = REPLY_HINT.findall(text)
    return int(found[-1]) if found else None


class SimDriver(Driver):
    """Simulated model: ``tokens_per_s`` per sequence after a prefill at
    ``prefill_tokens_per_s``, ``slots`` sequences at once."""

    name = "sim"

    def __init__(
        self,
        model: str | None = None,
        slots: int = 4,
        tokens_per_s: float = 200.0,
        prefill_tokens_per_s: float = 2000.0,
        max_context: int = 8192,
        eos_after: int | None = None,
        jitter: float = 0.0,
        seed: int = 0,
        prefix_cache_tokens: int = 0,
        load_s: float = 0.0,
    ) -> None:
        if tokens_per_s <= 0 or prefill_tokens_per_s <= 0:
            raise ValueError("tokens_per_s and prefill_tokens_per_s must be positive")
        if load_s < 0:
            raise ValueError("load_s (simulated load and wake time) cannot be negative")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter is a fraction of a decoding step, 0 <= jitter < 1")
        self._slots = slots
        self.model = model or "simulated"
        self.tokens_per_s = tokens_per_s
        self.prefill_tokens_per_s = prefill_tokens_per_s
        self.step_s = 1.0 / tokens_per_s
        self.max_context = max_context
        self.eos_after = eos_after  # emit "stop" after this many tokens (None: never)
        self.jitter = jitter
        self.seed = seed
        self.prefix_cache_tokens = prefix_cache_tokens
        self.load_s = load_s
        self._kept: OrderedDict[tuple[str, int], int] = OrderedDict()  # (prompt, made) -> tokens
        self._kept_total = 0
        self._aborted: set[str] = set()
        self._wakeups: dict[str, asyncio.Event] = {}  # requests prefilling, woken by abort
        self._state: DriverState = "unloaded"
        self._shut = False  # shut down after a load (a driver never loaded still serves tests)

    @property
    def slots(self) -> int:
        return self._slots

    async def load(self, progress: Progress | None = None) -> None:
        """Become ready after ``load_s`` simulated seconds (model residency studies)."""
        if self.load_s:
            self._state = "loading"
            await asyncio.sleep(self.load_s)
        self._state = "ready"
        self._shut = False

    async def shutdown(self) -> None:
        """Unload: the prefix cache is gone, and generating before ``load`` fails."""
        self._state, self._shut = "unloaded", True
        self._kept.clear()
        self._kept_total = 0

    def info(self) -> ModelInfo:
        detail = (
            f"simulated driver (no model): {self.tokens_per_s:g} tok/s per slot, "
            f"prefill {self.prefill_tokens_per_s:g} tok/s, jitter {self.jitter:g}, "
            f"prefix cache {self.prefix_cache_tokens} tokens"
        )
        return ModelInfo(
            "sim",
            self.model,
            self.max_context,
            self._slots,
            self._state,
            detail,
        )

    @staticmethod
    def _count(prompt: list[Message] | str) -> int:
        if isinstance(prompt, str):
            return len(prompt.split())
        return sum(1 + len(msg["content"].split()) for msg in prompt) + 1

    async def count_tokens(self, prompt: list[Message] | str) -> int:
        return self._count(prompt)

    def prefill_s(self, prompt_tokens: int, resumed_tokens: int = 0) -> float:
        """Seconds the simulated prefill of a request takes."""
        return (prompt_tokens + resumed_tokens) / self.prefill_tokens_per_s

    async def _prefill(self, rid: str, seconds: float) -> None:
        """Sleep ``seconds``, or less if ``rid`` is aborted meanwhile."""
        if seconds <= 0 or rid in self._aborted:
            return
        wake = self._wakeups[rid] = asyncio.Event()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await wake.wait()
        finally:
            self._wakeups.pop(rid, None)

    def _keep(self, key: tuple[str, int], tokens: int) -> None:
        """Remember an aborted sequence's cache, within the token budget."""
        if self.prefix_cache_tokens <= 0:
            return
        self._kept_total += tokens - self._kept.pop(key, 0)
        self._kept[key] = tokens
        while self._kept_total > self.prefix_cache_tokens:
            self._kept_total -= self._kept.popitem(last=False)[1]

    def _cached(self, key: tuple[str, int], tokens: int) -> int:
        """Tokens of a resumed sequence its kept cache covers (all but the last one); the
        entry is taken, as the sequence goes on extending it."""
        kept = self._kept.pop(key, None)
        if kept is None:
            return 0
        self._kept_total -= kept
        return tokens - 1 if key[1] and kept == tokens else 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        rid, opts = request.request_id, request.sampling
        if self._shut:
            raise DriverError("the sim driver was shut down (or put to sleep); load() it again")
        if opts.response_format is not None:
            await self.prepare_format(opts.response_format)  # refuses: no tokenizer, no grammar
        n_prompt = self._count(request.prompt)
        digest = hashlib.sha256(repr(request.prompt).encode()).hexdigest()
        start = int(digest[:6], 16)
        produced = list(request.resume_ids)
        cached = self._cached((digest, len(produced)), n_prompt + len(produced))
        eos_at = reply_hint(request.prompt)
        eos_at = self.eos_after if eos_at is None else eos_at
        rng = random.Random(f"{self.seed}:{start}:{len(produced)}") if self.jitter else None
        text_so_far = "".join(f" w{t}" for t in produced)
        loop = asyncio.get_running_loop()
        try:
            await self._prefill(
                rid, self.prefill_s(n_prompt, len(produced)) - cached / self.prefill_tokens_per_s
            )
            prefilled = rid not in self._aborted  # an abort may have cut the prefill short
            due = loop.time()  # tokens are due on a fixed schedule: loop latency does not add up
            while True:
                if rid in self._aborted:
                    if prefilled:
                        self._keep((digest, len(produced)), n_prompt + len(produced))
                    yield Delta("", [], n_prompt, len(produced), "abort", cached)
                    return
                if len(produced) >= opts.max_tokens or n_prompt + len(produced) >= self.max_context:
                    yield Delta("", [], n_prompt, len(produced), "length", cached)
                    return
                if eos_at is not None and len(produced) >= eos_at:
                    yield Delta("", [], n_prompt, len(produced), "stop", cached)
                    return
                due += self.step_s * (1.0 + self.jitter * rng.random()) if rng else self.step_s
                await asyncio.sleep(max(0.0, due - loop.time()))
                tok = start + len(produced)
                piece = f" w{tok}"
                produced.append(tok)
                for stop in opts.stop:
                    if stop in text_so_far + piece:
                        yield Delta("", [], n_prompt, len(produced), "stop", cached)
                        return
                text_so_far += piece
                # The last token carries the finish reason, as a real engine's does, so the
                # kernel never preempts (or streams an empty frame for) a finished answer.
                if eos_at is not None and len(produced) >= eos_at:
                    finish: FinishReason | None = "stop"
                elif (
                    len(produced) >= opts.max_tokens or n_prompt + len(produced) >= self.max_context
                ):
                    finish = "length"
                else:
                    finish = None
                yield Delta(piece, [tok], n_prompt, len(produced), finish, cached)
                if finish is not None:
                    return
        finally:
            self._aborted.discard(rid)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)
        if (wake := self._wakeups.get(request_id)) is not None:
            wake.set()
